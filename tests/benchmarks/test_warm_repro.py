"""The WARM reproduction's arithmetic (benchmarks/warm_repro), with hand-computed answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "warm_repro"))

import experiments
import members
import plots

from merger.recipe.finetune import FinetuneReport, MemberPlan, TrainedMember


def test_best_of_n_expectation_over_all_subsets_by_hand() -> None:
    # Proxy order (ascending) is c, a, b; control values a=10, b=0, c=4.
    proxy, control = [0.5, 0.9, 0.1], [10.0, 0.0, 4.0]
    assert experiments.bon_expected(proxy, control, 1) == pytest.approx(14 / 3)  # plain mean
    # Pairs {a,b} -> b (0), {a,c} -> a (10), {b,c} -> b (0): mean 10/3.
    assert experiments.bon_expected(proxy, control, 2) == pytest.approx(10 / 3)
    assert experiments.bon_expected(proxy, control, 3) == 0.0  # always the proxy's top: b
    with pytest.raises(ValueError, match="1 <= n <= 3"):
        experiments.bon_expected(proxy, control, 4)


def test_best_of_n_by_the_control_itself_never_decreases_with_n() -> None:
    control = torch.tensor([[3.0, -1.0, 0.0, 2.0], [1.0, 1.0, -2.0, 0.5]])
    curve = experiments.bon_curve(control, control, [1, 2, 4])
    assert curve[0] == pytest.approx((4 / 4 + 0.5 / 4) / 2)  # the means: 1.0 and 0.125
    assert curve[2] == pytest.approx((3.0 + 1.0) / 2)  # the maxima
    assert curve[0] <= curve[1] <= curve[2]


def test_win_rate_counts_ties_as_half() -> None:
    assert experiments.win_rate([3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 5.0, -1.0]) == 2.5 / 4
    with pytest.raises(ValueError, match="equal non-empty"):
        experiments.win_rate([], [])


def test_accuracy_counts_ties_as_half() -> None:
    assert experiments.accuracy(torch.tensor([0.3, -0.1, 0.0, 2.0])) == 2.5 / 4


def _member(name: str, lr: float, dropout: float, acc: float) -> TrainedMember:
    plan = MemberPlan(name=name, learning_rate=lr, dropout=dropout, seed=1, init_step=0)
    return TrainedMember(plan=plan, path=f"/m/{name}", key=name, train_loss=0.5, val_accuracy=acc)


def test_interpolation_pairs_the_best_member_with_the_best_of_other_hyperparameters() -> None:
    ranking = [
        _member("member-2", 1e-4, 0.1, 0.9),
        _member("member-0", 1e-4, 0.1, 0.8),
        _member("member-1", 1e-4, 0.0, 0.7),
    ]
    report = FinetuneReport(
        init="/m/init", train_pairs=8, val_pairs=4, ranking=ranking, kept=[], artifact=None
    )
    assert experiments.pick_pair(report) == ("/m/member-2", "/m/member-1")
    same = report.model_copy(update={"ranking": ranking[:2]})
    assert experiments.pick_pair(same) == ("/m/member-2", "/m/member-0")


def test_data_splits_corrupted_and_clean_training_pairs() -> None:
    data = members.make_data(members.Setup(base=Path("."), train_pairs=200, eval_pairs=10))
    assert len(data.corrupted) + len(data.clean_train) == 200
    assert all(p.flipped for p in data.corrupted)
    assert 30 <= len(data.corrupted) <= 70  # 25% of 200, give or take sampling
    assert len(data.val) == len(data.ood) == 10
    assert not any(p.flipped for p in data.val + data.ood)


def test_cached_json_computes_once_per_key(tmp_path: Path) -> None:
    calls: list[int] = []

    def compute() -> dict[str, int]:
        calls.append(1)
        return {"n": len(calls)}

    path = tmp_path / "r.json"
    assert members.cached_json(path, ["a", 1], compute) == {"n": 1}
    assert members.cached_json(path, ["a", 1], compute) == {"n": 1}
    assert members.cached_json(path, ["a", 2], compute) == {"n": 2}


def test_smoothing_is_a_trailing_mean() -> None:
    assert plots._smooth([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]


def test_the_reproduction_runs_end_to_end_on_a_tiny_model(tmp_path: Path, bert_rm: Path) -> None:
    """`run.py --quick` on a tiny BERT: every stage, the results, the figures, the report."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "warm_repro" / "run.py"
    work, figures = tmp_path / "work", tmp_path / "figures"
    argv = [sys.executable, str(script), "--quick", "--base", str(bert_rm)]
    argv += ["--work", str(work), "--figures", str(figures)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((work / "results.json").read_text())
    assert len(results["members"]) == 4
    assert set(results["interpolation"]) == {"members", "val", "ood", "corrupted"}
    assert {"ENS (M=4)", "WA (M=4)"} <= set(results["corruption"]["rows"])
    curves = results["best_of_n"]["curves"]
    assert results["best_of_n"]["n"] == [1, 2, 4, 8]
    # N = 1 is a uniformly random pick whatever the selector: every curve starts at the mean.
    assert len({round(c[0], 9) for c in curves.values()}) == 1
    assert curves["oracle"] == sorted(curves["oracle"])
    rl = results["rl"]
    assert set(rl["logs"]) == {"WARM M=4", "best single RM"}
    assert all(len(log) == 4 and "control_reward" in log[0] for log in rl["logs"].values())
    assert 0.0 <= rl["win_rate"] <= 1.0
    assert sorted(p.name for p in figures.iterdir()) == [
        "warm_repro_quick_bon.png",
        "warm_repro_quick_corruption.png",
        "warm_repro_quick_interpolation.png",
        "warm_repro_quick_rl.png",
    ]
    assert "### 4. RL with `warm-rl train`" in result.stdout
