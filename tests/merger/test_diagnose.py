"""LMC diagnostic: pure helpers by hand, then tiny real GPT-2 reward models end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import CORPUS, make_rm
from typer.testing import CliRunner

from merger.build import run_merge
from merger.cli import app
from merger.config import MergeSpec
from merger.diagnose import (
    JSON_NAME,
    PNG_NAME,
    Diagnosis,
    Verdict,
    agreement,
    average_states,
    chord,
    diagnose,
    lambda_grid,
    pairwise_accuracy,
    write_report,
)
from merger.errors import MergeError
from merger.plan import plan_merge
from merger.preferences import Preference, read_preferences

PAIRS = [
    Preference(prompt=f"Question {i}: what does it do?", chosen=CORPUS[i * 7], rejected=CORPUS[-i])
    for i in range(1, 13)
]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    """Write raw lines (not necessarily valid JSON) as a JSONL file."""
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- pure helpers -------------------------------------------------------------------------


def test_pairwise_accuracy_counts_ties_as_half() -> None:
    chosen = torch.tensor([1.0, 2.0, 3.0, 0.0])
    rejected = torch.tensor([0.0, 2.0, 4.0, -1.0])
    assert pairwise_accuracy(chosen, rejected) == (1 + 0.5 + 0 + 1) / 4


def test_agreement_treats_zero_as_its_own_sign() -> None:
    a = torch.tensor([1.0, -2.0, 0.0, 3.0, 0.0])
    b = torch.tensor([2.0, -0.1, 0.0, -1.0, 5.0])
    assert agreement(a, b) == 3 / 5


def test_helpers_reject_mismatched_or_empty_inputs() -> None:
    with pytest.raises(ValueError, match="equal non-empty"):
        pairwise_accuracy(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="equal non-empty"):
        agreement(torch.zeros(0), torch.zeros(0))


def test_chord_and_grid() -> None:
    assert chord(0.6, 0.8, 0.0) == 0.6
    assert chord(0.6, 0.8, 1.0) == 0.8
    assert chord(0.6, 0.8, 0.25) == pytest.approx(0.65)
    assert lambda_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="at least its two ends"):
        lambda_grid(1)


def test_average_states_by_hand() -> None:
    ids = torch.arange(3)
    a = {"w": torch.tensor([1.0, 2.0]), "ids": ids}
    b = {"w": torch.tensor([3.0, -2.0]), "ids": ids.clone()}
    out = average_states([a, b], [0.25, 0.75])
    assert torch.equal(out["w"], torch.tensor([2.5, -1.0]))
    assert out["w"].dtype == torch.float32
    assert torch.equal(out["ids"], ids)
    assert torch.equal(average_states([a, b], [1.0, 0.0])["w"], a["w"])  # exact at the ends
    with pytest.raises(MergeError, match="tensor ids differs"):
        average_states([a, {"w": b["w"], "ids": ids + 1}], [0.5, 0.5])


# --- load_preferences ---------------------------------------------------------------------


def test_load_preferences_reads_jsonl(tmp_path: Path) -> None:
    lines = [p.model_dump_json() for p in PAIRS[:2]]
    path = write_jsonl(
        tmp_path / "prefs.jsonl", [lines[0], "", json.dumps({**PAIRS[1].model_dump(), "id": 7})]
    )
    assert read_preferences(path) == PAIRS[:2]


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (
            ['{"prompt": "p", "chosen": "c", "rejected": "r"}', "{oops"],
            r"bad\.jsonl:2: invalid JSON",
        ),
        (["", '{"prompt": "p", "chosen": "c"}'], r"bad\.jsonl:2: field rejected: Field required"),
        (['{"prompt": 1, "chosen": "c", "rejected": "r"}'], r"bad\.jsonl:1: field prompt"),
        (['["p", "c", "r"]'], r"bad\.jsonl:1: expected a JSON object, got list"),
        ([], r"bad\.jsonl: no preference pairs"),
        (["  ", ""], r"bad\.jsonl: no preference pairs"),
    ],
)
def test_load_preferences_errors_name_file_and_line(
    tmp_path: Path, lines: list[str], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        read_preferences(write_jsonl(tmp_path / "bad.jsonl", lines))


def test_load_preferences_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nowhere\.jsonl: cannot read"):
        read_preferences(tmp_path / "nowhere.jsonl")


# --- end to end on tiny GPT-2 reward models -----------------------------------------------


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> list[Path]:
    """Three tiny GPT-2 RMs: same config and tokenizer, different seeds."""
    root = tmp_path_factory.mktemp("diagnose_members")
    return [
        make_rm(root / f"rm-{seed}", "gpt2", seed=seed, tokenizer_dir=tiny_tokenizer_dir)
        for seed in (1, 2, 3)
    ]


@pytest.fixture(scope="module")
def diag(members: list[Path]) -> Diagnosis:
    """The diagnostic over all three members (uneven batches, truncation on)."""
    return diagnose(members, PAIRS, lambdas=lambda_grid(3), batch_size=5, max_length=12)


def test_curve_ends_are_the_members(diag: Diagnosis) -> None:
    acc_a, acc_b = diag.members[0].accuracy, diag.members[1].accuracy
    start, end = diag.curve[0], diag.curve[-1]
    assert (start.lam, end.lam) == (0.0, 1.0)
    assert start.wa_accuracy == start.ens_accuracy == start.chord == acc_a
    assert end.wa_accuracy == end.ens_accuracy == end.chord == acc_b
    assert start.agreement == end.agreement == 1.0
    assert diag.pairs == len(PAIRS)
    assert diag.barrier == max(p.chord - p.wa_accuracy for p in diag.curve)
    for value in [m.accuracy for m in diag.members] + [p.agreement for p in diag.curve]:
        assert (value * 2 * len(PAIRS)).is_integer()  # multiples of half a pair


def test_uniform_comparison_for_three_members(diag: Diagnosis) -> None:
    assert diag.uniform is not None
    assert diag.uniform.members == 3
    assert 0.0 <= diag.uniform.agreement <= 1.0


def test_midpoint_matches_the_built_artifact(
    members: list[Path], diag: Diagnosis, tmp_path: Path
) -> None:
    # warm-merge build of A and B is the lambda = 0.5 weight average, bit for bit.
    artifact = tmp_path / "warm"
    run_merge(plan_merge(MergeSpec(inputs=tuple(members[:2]))), artifact)
    alone = diagnose([artifact, artifact], PAIRS, lambdas=[0.0], batch_size=5, max_length=12)
    assert diag.curve[1].lam == 0.5
    assert alone.members[0].accuracy == diag.curve[1].wa_accuracy
    assert alone.uniform is None


def test_report_files(diag: Diagnosis, tmp_path: Path) -> None:
    out = tmp_path / "report" / "nested"
    json_path, png_path = write_report(diag, out)
    assert (json_path, png_path) == (out / JSON_NAME, out / PNG_NAME)
    assert Diagnosis.model_validate_json(json_path.read_text()) == diag
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == [JSON_NAME, PNG_NAME]  # no temp files left


def test_input_errors(members: list[Path], tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    with pytest.raises(ValueError, match="at least two checkpoints"):
        diagnose(members[:1], PAIRS, lambdas=[0.5])
    with pytest.raises(ValueError, match=r"lambda 1\.5 is outside"):
        diagnose(members[:2], PAIRS, lambdas=[0.0, 1.5])
    bert = make_rm(tmp_path / "bert", "bert", seed=1, tokenizer_dir=tiny_tokenizer_dir)
    with pytest.raises(MergeError, match="tensor"):
        diagnose([members[0], bert], PAIRS, lambdas=[0.5])
    bare = [m / "model.safetensors" for m in members[:2]]
    with pytest.raises(MergeError, match="needs model directories"):
        diagnose(bare, PAIRS, lambdas=[0.5])


def test_cli(members: list[Path], tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prefs.jsonl", [p.model_dump_json() for p in PAIRS])
    out = tmp_path / "out"
    args = ["diagnose", *map(str, members[:2]), "--data", str(data), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--steps", "3", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "barrier" in result.output
    assert "member 1 accuracy" in result.output
    diag = Diagnosis.model_validate_json((out / JSON_NAME).read_text())
    assert [p.lam for p in diag.curve] == [0.0, 0.5, 1.0]
    assert (out / PNG_NAME).is_file()

    bad = write_jsonl(tmp_path / "bad-prefs.jsonl", ['{"prompt": "p", "chosen": "c"}'])
    result = CliRunner().invoke(app, [*args[:3], "--data", str(bad), "--out", str(out / "x")])
    assert result.exit_code == 1
    assert "bad-prefs.jsonl:1" in result.output
    assert not (out / "x").exists()


def test_cli_verdicts(members: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_jsonl(tmp_path / "prefs.jsonl", [p.model_dump_json() for p in PAIRS])
    shift = write_jsonl(tmp_path / "shift.jsonl", [p.model_dump_json() for p in PAIRS[6:]])
    args = ["diagnose", *map(str, members), "--data", str(data), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--steps", "2", "--eval", str(shift)])
    assert result.exit_code == 0, result.output
    assert "shift.jsonl (6 pairs): WA " in result.output and "standard error" in result.output
    losing = Verdict(
        name="shift.jsonl", pairs=6, wa_accuracy=0.2, ens_accuracy=0.5, best_member=2,
        best_accuracy=0.9, standard_error=0.1, loses=True,
    )  # fmt: skip
    monkeypatch.setattr("merger.diagnose.verdict", lambda *_: losing)
    result = CliRunner().invoke(app, [*args, "--steps", "2", "--eval", str(shift)])
    assert result.exit_code == 0, result.output
    assert "warning: on shift.jsonl, averaging loses" in result.output
    assert "below member 2" in result.output
