"""Calibration: statistics, temperature and golden set by hand, then `warm-merge calibrate`
on a tiny WARM artifact (recorded, verified, atomic)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import CORPUS, make_rm
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from merger.build import run_merge
from merger.calibration import (
    CALIBRATION_NAME,
    Rendering,
    calibrate,
    choose_golden,
    fit_temperature,
    pair_metrics,
    read_calibration,
    reward_stats,
    score_preferences,
    split_pairs,
)
from merger.cli import app
from merger.config import MergeSpec
from merger.errors import MergeError
from merger.manifest import MANIFEST_NAME, read_manifest, verify_artifact
from merger.plan import plan_merge
from merger.preferences import Preference, write_preferences

runner = CliRunner()

PAIRS = [
    Preference(prompt=f"Question {i}: what does it do?", chosen=CORPUS[i * 5], rejected=CORPUS[-i])
    for i in range(1, 25)
]


# --- pure functions, by hand -----------------------------------------------------------


def test_reward_statistics_by_hand() -> None:
    stats = reward_stats([1.0, 2.0, 3.0, 4.0])
    assert (stats.count, stats.mean) == (4, 2.5)
    assert stats.std == pytest.approx(math.sqrt(1.25))  # population: mean of (1.5^2, 0.5^2, ..)
    assert stats.quantiles[0] == 1.0 and stats.quantiles[50] == 2.5 and stats.quantiles[-1] == 4.0
    assert len(stats.quantiles) == 101
    z = stats.zscore(np.array([1.0, 2.0, 3.0, 4.0]))
    assert abs(z.mean()) < 1e-12 and abs(z.std() - 1.0) < 1e-12
    # Quantiles: linear between the recorded points, 0 and 1 outside.
    got = stats.quantile(np.array([0.5, 1.0, 2.5, 4.0, 9.0]))
    np.testing.assert_allclose(got, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_quantiles_stay_in_the_unit_interval_and_monotone_with_ties() -> None:
    stats = reward_stats([1.0, 1.0, 1.0, 2.0, 5.0])
    grid = np.linspace(-1.0, 7.0, 400)
    mapped = stats.quantile(grid)
    assert mapped.min() >= 0.0 and mapped.max() <= 1.0
    assert np.all(np.diff(mapped) >= 0.0)


def test_pair_metrics_by_hand() -> None:
    got = pair_metrics([2.0, -1.0, 0.0], 1.0)
    assert got.pairs == 3 and got.accuracy == pytest.approx(0.5)  # 1 + 0 + a tie's half
    want = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0)) + math.log(2.0)) / 3
    assert got.log_loss == pytest.approx(want)
    assert pair_metrics([2.0], 2.0).log_loss == pytest.approx(math.log1p(math.exp(-1.0)))


def test_the_fitted_temperature_is_the_maximum_likelihood_one() -> None:
    # Three pairs won by a margin of 1, one lost by 1: sigmoid(1/T) = 3/4, T = 1/ln 3.
    assert fit_temperature([1.0, 1.0, 1.0, -1.0]) == pytest.approx(1 / math.log(3), rel=1e-4)
    # Margins ten times larger: a temperature ten times larger.
    assert fit_temperature([10.0, 10.0, 10.0, -10.0]) == pytest.approx(10 / math.log(3), rel=1e-4)


def test_on_the_pairs_it_is_fitted_on_the_temperature_never_loses() -> None:
    margins = np.random.default_rng(0).normal(0.5, 2.0, size=200)
    t = fit_temperature(margins)
    assert pair_metrics(margins, t).log_loss <= pair_metrics(margins, 1.0).log_loss
    for other in (t * 0.9, t * 1.1):
        assert pair_metrics(margins, t).log_loss <= pair_metrics(margins, other).log_loss


def test_rewards_that_do_not_vary_are_refused() -> None:
    rendering = Rendering(separator="\n\n", max_length=64, truncation_side="left")
    with pytest.raises(ValueError, match=r"all score 0\.5: no scale"):
        calibrate(
            PAIRS[:4], [0.5] * 4, [0.5] * 4, [5] * 8, [False] * 8,
            golden=2, holdout=0.5, seed=0, data=("d", "0" * 64), rendering=rendering,
        )  # fmt: skip


def test_perfectly_ordered_pairs_get_the_smallest_temperature_searched() -> None:
    t = fit_temperature([1.0, 2.0, 3.0])
    rms = math.sqrt((1 + 4 + 9) / 3)
    assert t == pytest.approx(rms / 1e3, rel=1e-3)


def test_the_split_is_seeded_disjoint_and_whole() -> None:
    fit, held = split_pairs(10, 0.3, seed=7)
    assert len(held) == 3 and len(fit) == 7
    assert sorted([*fit, *held]) == list(range(10))
    again = split_pairs(10, 0.3, seed=7)
    assert np.array_equal(fit, again[0]) and np.array_equal(held, again[1])
    assert len(split_pairs(2, 0.9, seed=0)[0]) == 1  # one pair left to fit on
    with pytest.raises(ValueError, match="at least 2"):
        split_pairs(1, 0.5, seed=0)
    with pytest.raises(ValueError, match="strictly between"):
        split_pairs(10, 1.0, seed=0)


def test_the_golden_set_spans_rewards_and_lengths_of_untruncated_items() -> None:
    rewards = [0.5, -3.0, 2.0, 9.0, 0.0, 1.0, -1.0, 4.0]
    lengths = [10, 20, 3, 15, 40, 12, 50, 8]
    eligible = [True] * 6 + [False, True]  # item 6 (the longest) was truncated
    picked = choose_golden(rewards, lengths, eligible, 4)
    assert len(picked) == 4 and 6 not in picked
    # Reward extremes (1: -3.0, 3: 9.0) and length extremes among eligible (2: 3, 4: 40).
    assert set(picked) == {1, 3, 2, 4}
    assert [rewards[i] for i in picked] == sorted(rewards[i] for i in picked)
    assert sorted(choose_golden(rewards, lengths, eligible, 99)) == [0, 1, 2, 3, 4, 5, 7]
    assert choose_golden(rewards, lengths, eligible, 0) == []


# --- warm-merge calibrate on a tiny artifact -----------------------------------------------


@pytest.fixture
def artifact(tmp_path: Path, tiny_tokenizer_dir: Path) -> Path:
    members = [
        make_rm(tmp_path / f"m{seed}", "gpt2", seed=seed, tokenizer_dir=tiny_tokenizer_dir)
        for seed in (1, 2)
    ]
    out = tmp_path / "warm"
    run_merge(plan_merge(MergeSpec(inputs=tuple(members))), out)
    return out


def run(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def direct_reward(model_dir: Path, prompt: str, response: str) -> float:
    """transformers' own fp32 forward of one rendered response (no template: prompt, blank
    line, response; the tokenizer's special tokens added)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    ids = tokenizer(f"{prompt}\n\n{response}", return_tensors="pt")
    with torch.inference_mode():
        return float(model(**ids).logits[0, 0])


def test_calibrate_records_a_verified_new_version_of_the_artifact(
    artifact: Path, tmp_path: Path
) -> None:
    data = write_preferences(PAIRS, tmp_path / "prefs.jsonl")
    before = read_manifest(artifact).fingerprint
    code, output = run("calibrate", artifact, "--data", data, "--golden", "8", "--max-length", "64")
    assert code == 0, output
    assert "temperature" in output and "golden set: 8 responses" in output
    manifest = verify_artifact(artifact)  # the new file is listed and hashed
    assert CALIBRATION_NAME in manifest.files and manifest.fingerprint != before
    assert manifest.fingerprint[:16] in output
    calibration = read_calibration(artifact, manifest.files[CALIBRATION_NAME])
    assert calibration is not None
    assert calibration.data.pairs == len(PAIRS) and calibration.data.name == "prefs.jsonl"
    assert calibration.rewards.count == 2 * len(PAIRS)
    t = calibration.temperature
    assert t.fit_pairs + t.after.pairs == len(PAIRS) and t.value > 0
    # The golden rewards are the artifact's own fp32 rewards of the rendered responses.
    assert len(calibration.golden) == 8
    for item in calibration.golden[:3]:
        want = direct_reward(artifact, item.prompt, item.response)
        assert item.reward == pytest.approx(want, abs=1e-5)
    # Every reference response, scored again: z-scores of mean 0 and std 1, quantiles in
    # [0, 1] and non-decreasing in the reward.
    chosen, rejected, _, _ = score_preferences(artifact, PAIRS, calibration.rendering, 16)
    rewards = np.array([*chosen, *rejected])
    z = calibration.rewards.zscore(rewards)
    assert abs(z.mean()) < 1e-9 and abs(z.std() - 1.0) < 1e-9
    q = calibration.rewards.quantile(rewards)
    assert q.min() == 0.0 and q.max() == 1.0
    assert np.all(np.diff(q[np.argsort(rewards)]) >= 0)
    # Calibrating again replaces the calibration (same data: the same fingerprint).
    code, output = run("calibrate", artifact, "--data", data, "--golden", "8", "--max-length", "64")
    assert code == 0 and read_manifest(artifact).fingerprint == manifest.fingerprint


def test_an_interrupted_calibration_is_repaired_by_calibrating_again(
    artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_preferences(PAIRS, tmp_path / "prefs.jsonl")
    with monkeypatch.context() as patch:  # the process dies between the two writes
        patch.setattr("merger.calibration.build_manifest", lambda *_: 1 / 0)
        assert run("calibrate", artifact, "--data", data, "--golden", "4")[0] != 0
    assert (artifact / CALIBRATION_NAME).is_file()  # written, not listed
    assert CALIBRATION_NAME not in read_manifest(artifact).files
    (artifact / f".{MANIFEST_NAME}.x.tmp").write_text("left by a kill")
    code, output = run("calibrate", artifact, "--data", data, "--golden", "4")
    assert code == 0, output
    assert CALIBRATION_NAME in verify_artifact(artifact).files  # whole again, nothing left


def test_calibrating_keeps_the_files_readable_for_others(artifact: Path, tmp_path: Path) -> None:
    data = write_preferences(PAIRS, tmp_path / "prefs.jsonl")
    (artifact / MANIFEST_NAME).chmod(0o644)
    assert run("calibrate", artifact, "--data", data, "--golden", "4")[0] == 0
    assert (artifact / MANIFEST_NAME).stat().st_mode & 0o777 == 0o644
    assert (artifact / CALIBRATION_NAME).stat().st_mode & 0o777 == 0o644


def test_a_changed_calibration_fails_verify(artifact: Path, tmp_path: Path) -> None:
    data = write_preferences(PAIRS, tmp_path / "prefs.jsonl")
    assert run("calibrate", artifact, "--data", data, "--golden", "4")[0] == 0
    path = artifact / CALIBRATION_NAME
    record = json.loads(path.read_text())
    record["temperature"]["value"] *= 2
    path.write_text(json.dumps(record))
    code, output = run("verify", artifact)
    assert code == 1 and CALIBRATION_NAME in output
    with pytest.raises(MergeError, match="SHA-256"):
        read_calibration(artifact, read_manifest(artifact).files[CALIBRATION_NAME])


def test_bad_data_is_one_line_and_leaves_the_artifact_as_it_was(
    artifact: Path, tmp_path: Path
) -> None:
    manifest = (artifact / MANIFEST_NAME).read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a"}\n')
    code, output = run("calibrate", artifact, "--data", bad)
    assert code == 1 and "bad.jsonl:1: field rejected" in output
    one = write_preferences(PAIRS[:1], tmp_path / "one.jsonl")
    code, output = run("calibrate", artifact, "--data", one)
    assert code == 1 and "at least 2" in output
    assert (artifact / MANIFEST_NAME).read_bytes() == manifest
    assert not (artifact / CALIBRATION_NAME).exists()
    assert not [p for p in artifact.iterdir() if p.name.startswith(".")]  # no temporary left


def test_only_artifacts_are_calibrated(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    plain = make_rm(tmp_path / "plain", "gpt2", seed=0, tokenizer_dir=tiny_tokenizer_dir)
    data = write_preferences(PAIRS, tmp_path / "prefs.jsonl")
    code, output = run("calibrate", plain, "--data", data)
    assert code == 1 and "not a WARM artifact" in output
    assert not (plain / CALIBRATION_NAME).exists()


def test_the_data_is_named_by_its_pairs_not_its_file() -> None:
    from merger.preferences import pairs_sha256
    from merger.recipe.prefdata import generate

    generated = generate("val", 6, seed=1, noise=0.0, spurious_corr=0.5)  # labels as extras
    bare = [Preference(prompt=p.prompt, chosen=p.chosen, rejected=p.rejected) for p in generated]
    assert pairs_sha256(generated) == pairs_sha256(bare)
    swapped = [*bare[:-1], Preference(prompt=bare[-1].prompt, chosen=bare[-1].rejected,
                                      rejected=bare[-1].chosen)]  # fmt: skip
    assert pairs_sha256(swapped) != pairs_sha256(bare)


def test_an_unreadable_calibration_is_one_line(tmp_path: Path) -> None:
    (tmp_path / CALIBRATION_NAME).write_text('{"format": "warm-rm.calibration/1"}')
    with pytest.raises(MergeError, match="invalid calibration at data: Field required"):
        read_calibration(tmp_path)
    assert read_calibration(tmp_path / "elsewhere") is None
