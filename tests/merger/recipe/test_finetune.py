"""`warm-merge finetune`: diverse members from one init, ranked, the best merged (tiny BERT)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import BertConfig
from typer.testing import CliRunner

from merger.calibration import CALIBRATION_NAME, read_calibration
from merger.cli import app
from merger.manifest import verify_artifact
from merger.preferences import pairs_sha256, read_preferences, write_preferences
from merger.recipe.cli import MemberBars
from merger.recipe.finetune import (
    MEMBER_FILE,
    REPORT_FILE,
    FinetuneSpec,
    MemberPlan,
    TrainedMember,
    _set_dropout,
    accuracy,
    finetune,
    load_rm,
    pair_rewards,
    plan_members,
    rank,
)
from merger.recipe.prefdata import generate

TRAIN = generate("train", 48, seed=0)
VAL = generate("val", 24, seed=0)


def spec_for(base: Path, out: Path, **kwargs: object) -> FinetuneSpec:
    """A spec small enough for a test: a few steps per member."""
    defaults: dict[str, object] = {"members": 3, "batch_size": 8, "max_length": 64}
    return FinetuneSpec(base=base, out=out, **(defaults | kwargs))  # type: ignore[arg-type]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_members_cycle_through_the_grid_with_their_own_seeds(tmp_path: Path) -> None:
    spec = FinetuneSpec(
        base=tmp_path, out=tmp_path, members=5, learning_rates=(1e-4, 5e-5), dropouts=(0.1, 0.0),
        seed=7, baklava_steps=3,
    )  # fmt: skip
    plans = plan_members(spec)
    assert [(p.learning_rate, p.dropout) for p in plans] == [
        (1e-4, 0.1), (1e-4, 0.0), (5e-5, 0.1), (5e-5, 0.0), (1e-4, 0.1),
    ]  # fmt: skip
    assert [p.seed for p in plans] == [8, 9, 10, 11, 12]
    assert [p.init_step for p in plans] == [0, 3, 6, 9, 12]
    assert [p.name for p in plans] == [f"member-{i}" for i in range(5)]


def test_rank_puts_the_best_first_and_keeps_member_order_on_ties() -> None:
    def result(name: str, acc: float) -> TrainedMember:
        plan = MemberPlan(name=name, learning_rate=1e-4, dropout=0.0, seed=1, init_step=0)
        return TrainedMember(plan=plan, path=name, key="k", train_loss=0.5, val_accuracy=acc)

    ranked = rank([result("a", 0.6), result("b", 0.8), result("c", 0.6), result("d", 0.9)])
    assert [r.plan.name for r in ranked] == ["d", "b", "a", "c"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"members": 2, "keep": 3}, "keep \\(3\\) exceeds members \\(2\\)"),
        ({"learning_rates": (0.0,)}, "learning rate 0.0 is outside"),
        ({"dropouts": (1.0,)}, "dropout 1.0 is outside"),
        ({"members": 0}, "members"),
        ({"learning_rates": ()}, "learning_rates"),
        ({"merge": False, "calibrate": True}, "calibrate needs merge"),
        ({"select": "greedy", "keep": 2}, "keep is top-k's"),
        ({"select": "top-k"}, "select top-k needs keep"),
    ],
)
def test_bad_specs_are_refused(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        FinetuneSpec(base=tmp_path, out=tmp_path, **kwargs)  # type: ignore[arg-type]


def test_calibrating_on_too_few_pairs_is_refused_before_training(
    tmp_path: Path, bert_rm: Path
) -> None:
    spec = spec_for(bert_rm, tmp_path / "out", calibrate=True)
    with pytest.raises(ValueError, match="calibrate: 1 validation pair"):
        finetune(spec, TRAIN, VAL[:1])
    assert not (tmp_path / "out").exists()  # nothing trained


def test_set_dropout_sets_every_dropout_field_and_returns_the_old_values() -> None:
    config = BertConfig(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2)
    old = _set_dropout(config, 0.3)
    assert old == {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.2}
    assert config.hidden_dropout_prob == 0.3 and config.attention_probs_dropout_prob == 0.3


def test_finetune_trains_ranks_merges_and_reuses(tmp_path: Path, bert_rm: Path) -> None:
    spec = spec_for(bert_rm, tmp_path / "out", keep=2)
    logs: list[str] = []
    steps: list[tuple[str, int, int]] = []
    report = finetune(spec, TRAIN, VAL, log=logs.append, steps=lambda *s: steps.append(s))

    init = weights(tmp_path / "out" / "init")
    members = {r.plan.name: weights(Path(r.path)) for r in report.ranking}
    assert len(members) == 3
    name = "bert.encoder.layer.0.attention.self.query.weight"
    for state in members.values():  # every member moved away from the shared init ...
        assert not torch.equal(state[name], init[name])
    a, b, c = members.values()  # ... and away from each other (lr, dropout, order differ)
    assert not torch.equal(a[name], b[name]) and not torch.equal(b[name], c[name])

    accs = [r.val_accuracy for r in report.ranking]
    assert accs == sorted(accs, reverse=True) and all(0 <= x <= 1 for x in accs)
    assert report.kept == [r.plan.name for r in report.ranking[:2]]
    # The artifact is the uniform average of the two kept members.
    assert report.artifact is not None
    verify_artifact(Path(report.artifact))
    merged = load_file(str(next(Path(report.artifact).glob("*.safetensors"))))
    kept = [members[k] for k in report.kept]
    torch.testing.assert_close(merged[name], (kept[0][name] + kept[1][name]) / 2)
    # Members share the init's config (training-time dropout is recorded, not saved).
    configs = {(Path(r.path) / "config.json").read_text() for r in report.ranking}
    assert len(configs) == 1
    assert (tmp_path / "out" / REPORT_FILE).is_file()
    assert (Path(report.ranking[0].path) / MEMBER_FILE).is_file()
    assert sum("lr " in line for line in logs) == 3
    # Progress: each member from step 0 to its last, one step at a time.
    for member in members:
        seen = [(done, total) for name, done, total in steps if name == member]
        total = seen[0][1]
        assert total > 0 and seen == [(done, total) for done in range(total + 1)]

    # A rerun with the same inputs trains nothing; a changed grid retrains what changed.
    logs.clear()
    steps.clear()
    again = finetune(spec, TRAIN, VAL, log=logs.append, steps=lambda *s: steps.append(s))
    assert sum("lr " in line for line in logs) == 0
    assert sorted(steps) == [(name, 1, 1) for name in sorted(members)]  # reused: done
    assert [r.val_accuracy for r in again.ranking] == accs
    logs.clear()
    finetune(
        spec_for(bert_rm, tmp_path / "out", keep=2, dropouts=(0.1, 0.2)),
        TRAIN,
        VAL,
        log=logs.append,
    )
    assert [line.split(":")[0] for line in logs if "lr " in line] == ["member-1"]


def test_a_greedy_soup_merges_the_members_it_keeps(tmp_path: Path, bert_rm: Path) -> None:
    spec = spec_for(bert_rm, tmp_path / "out", select="greedy")
    report = finetune(spec, TRAIN, VAL)
    best = report.ranking[0]
    first = report.selection[0]
    # The soup starts from the best member alone, scored as the member on disk scores.
    assert first.members == [best.plan.name] and first.kept
    model, tokenizer = load_rm(Path(best.path))
    assert first.score == accuracy(model, tokenizer, VAL, spec)
    assert len(report.selection) == len(report.ranking)  # every other member tried once
    kept = sorted(report.kept)
    assert kept == max((t for t in report.selection if t.kept), key=lambda t: t.score).members
    assert report.artifact is not None
    merged = load_file(str(next(Path(report.artifact).glob("*.safetensors"))))
    members = [weights(Path(r.path)) for r in report.ranking if r.plan.name in kept]
    name = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(merged[name], sum(m[name] for m in members) / len(members))
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["selection"]


def test_early_stopping_keeps_the_best_checkpoint(tmp_path: Path, bert_rm: Path) -> None:
    # A learning rate high enough that the held-out loss does not keep falling.
    spec = spec_for(
        bert_rm, tmp_path / "out", members=1, learning_rates=(3e-3,), epochs=4.0,
        early_stopping=True, evaluations=8, patience=2, merge=False,
    )  # fmt: skip
    (member,) = finetune(spec, TRAIN, VAL).ranking
    # 48 pairs in batches of 8 for 4 epochs: 24 steps, evaluated every 3; it stopped once two
    # evaluations in a row had not improved on the best.
    assert member.steps is not None and member.steps < 24
    assert member.best_step is not None and member.best_val_loss is not None
    losses = dict(member.val_losses)
    assert member.best_val_loss == min(losses.values()) == losses[member.best_step]
    assert max(losses) == member.steps and member.best_step < member.steps
    # The member saved is the best checkpoint, not the last: its held-out loss is the best.
    model, tokenizer = load_rm(Path(member.path))
    chosen, rejected = pair_rewards(model, tokenizer, VAL, max_length=spec.max_length)
    loss = float(torch.nn.functional.softplus(rejected - chosen).mean())
    assert loss == pytest.approx(member.best_val_loss, abs=1e-4)
    assert abs(loss - losses[member.steps]) > 1e-3


def test_baklava_members_start_from_checkpoints_of_one_run(tmp_path: Path, bert_rm: Path) -> None:
    spec = spec_for(bert_rm, tmp_path / "out", members=3, baklava_steps=2, merge=False)
    report = finetune(spec, TRAIN, VAL)
    out = tmp_path / "out"
    step2, step4 = weights(out / "baklava" / "step-2"), weights(out / "baklava" / "step-4")
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(step2[name], step4[name])
    assert sorted(r.plan.init_step for r in report.ranking) == [0, 2, 4]
    assert report.artifact is None and not (out / "warm").exists()


def test_command_line(tmp_path: Path, bert_rm: Path) -> None:
    train, val = (
        write_preferences(TRAIN, tmp_path / "train.jsonl"),
        write_preferences(VAL, tmp_path / "val.jsonl"),
    )
    args = [
        "finetune", "--data", str(train), "--val", str(val), "--out", str(tmp_path / "o"),
        "--base", str(bert_rm), "--members", "2", "--batch-size", "8", "--max-length", "64",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "member-0" in result.output and "WARM artifact of 2 members" in result.output
    bad = CliRunner().invoke(app, [*args, "--lr", "fast"])
    assert bad.exit_code == 1 and "--lr: 'fast' is not a comma-separated list" in bad.output
    worse = CliRunner().invoke(app, [*args, "--keep", "5"])
    assert worse.exit_code == 1 and "keep (5) exceeds members (2)" in worse.output
    # --calibrate: the artifact is calibrated on the validation pairs.
    calibrated = CliRunner().invoke(app, [*args, "--calibrate", "--golden", "4"])
    assert calibrated.exit_code == 0, calibrated.output
    assert "calibrated: temperature" in calibrated.output
    artifact = tmp_path / "o" / "warm"
    calibration = read_calibration(artifact, verify_artifact(artifact).files[CALIBRATION_NAME])
    assert calibration is not None and 0 < len(calibration.golden) <= 4
    assert all(g.n_tokens < 64 for g in calibration.golden)  # none truncated
    assert calibration.data.sha256 == pairs_sha256(read_preferences(val)) == pairs_sha256(VAL)
    assert calibration.rendering.max_length == 64


def test_member_bars_count_the_members_that_are_done() -> None:
    with MemberBars(3) as bars:
        bars.update("member-0", 0, 4)
        bars.update("member-0", 4, 4)
        bars.update("member-1", 1, 1)  # reused
        bars.update("member-2", 2, 5)
        overall = bars._bars.tasks[0]
        assert (overall.description, overall.completed, overall.total) == ("members", 2, 3)
