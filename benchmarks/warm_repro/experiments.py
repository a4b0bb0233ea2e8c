"""The four experiments of the reproduction, each returning plain JSON-able results.

1. `interpolation`: accuracy along lambda between two members, weight averaging (WA) vs
   prediction ensembling (ENS) vs the chord, on the ID validation and the OOD split
   (`merger.diagnose`, as `warm-merge diagnose` computes it).
2. `corruption`: each member, ENS and WA of all members, on the corrupted training pairs
   (accuracy against the flipped labels: memorisation, lower is better), the clean training
   pairs, ID validation and OOD.
3. `best_of_n`: the expected oracle (control) reward of best-of-N among a policy's samples,
   selected by WARM (M = 1 is the best single RM) and by ENS, for N = 1 .. 64.
4. RL (`rl.py`): `warm-rl train` against WARM and against the best single RM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from members import Data, Setup, margins, rewards

from merger.diagnose import diagnose, lambda_grid
from merger.diagnose import margin_accuracy as accuracy
from merger.recipe.finetune import FinetuneReport
from merger.recipe.prefdata import oracle

BON_SIZES = (1, 2, 4, 8, 16, 32, 64)


def pick_pair(report: FinetuneReport) -> tuple[str, str]:
    """The best member and the best one trained with other hyperparameters (or the runner-up)."""
    best = report.ranking[0]
    for other in report.ranking[1:]:
        if (other.plan.learning_rate, other.plan.dropout) != (
            best.plan.learning_rate,
            best.plan.dropout,
        ):
            return best.path, other.path
    return best.path, report.ranking[1].path


def interpolation(
    report: FinetuneReport, data: Data, setup: Setup, steps: int = 11
) -> dict[str, Any]:
    """WA vs ENS vs chord along lambda between two members, per split."""
    a, b = pick_pair(report)
    out: dict[str, Any] = {"members": [Path(a).name, Path(b).name]}
    for split, pairs in (("val", data.val), ("ood", data.ood), ("corrupted", data.corrupted)):
        diag = diagnose(
            [Path(a), Path(b)],
            pairs,
            lambdas=lambda_grid(steps),
            batch_size=64,
            max_length=setup.max_length,
        )
        out[split] = diag.model_dump(mode="json")
    return out


def corruption(report: FinetuneReport, warm: Path, data: Data, setup: Setup) -> dict[str, Any]:
    """Accuracy of every member, ENS and WA on the four evaluation sets."""
    splits = {
        "corrupted-train": data.corrupted,
        "clean-train": data.clean_train,
        "val": data.val,
        "ood": data.ood,
    }
    rows: dict[str, dict[str, float]] = {}
    per_member: dict[str, list[torch.Tensor]] = {s: [] for s in splits}
    for member in report.ranking:
        name = Path(member.path).name
        rows[name] = {}
        for split, pairs in splits.items():
            margin = margins(Path(member.path), pairs, setup.max_length)
            per_member[split].append(margin)
            rows[name][split] = accuracy(margin)
    m = len(report.ranking)
    rows[f"ENS (M={m})"] = {s: accuracy(torch.stack(per_member[s]).mean(0)) for s in splits}
    rows[f"WA (M={m})"] = {
        s: accuracy(margins(warm, pairs, setup.max_length)) for s, pairs in splits.items()
    }
    return {"corrupted_pairs": len(data.corrupted), "rows": rows}


def bon_expected(proxy: Sequence[float], control: Sequence[float], n: int) -> float:
    """E[control of the proxy-best of n samples drawn without replacement from the K given].

    Sorted by proxy, the i-th smallest (1-based) is the best of a uniform n-subset with
    probability C(i-1, n-1) / C(K, n): the exact expectation over all subsets, no resampling.
    """
    k = len(proxy)
    if len(control) != k or not 1 <= n <= k:
        raise ValueError(f"need {k} control values and 1 <= n <= {k}, got {len(control)} and {n}")
    order = sorted(range(k), key=lambda i: proxy[i])
    total = math.comb(k, n)
    return sum(math.comb(rank, n - 1) * control[i] for rank, i in enumerate(order)) / total


def bon_curve(proxy: torch.Tensor, control: torch.Tensor, sizes: Sequence[int]) -> list[float]:
    """Mean over prompts of `bon_expected`, per N. proxy, control: [prompts, K]."""
    return [
        sum(bon_expected(p.tolist(), c.tolist(), n) for p, c in zip(proxy, control, strict=True))
        / len(proxy)
        for n in sizes
    ]


def best_of_n(
    report: FinetuneReport,
    warm: dict[int, Path],
    prompts: Sequence[str],
    samples: Sequence[Sequence[str]],
    setup: Setup,
) -> dict[str, Any]:
    """Control reward of best-of-N by WARM (each M), ENS (each M > 1) and the oracle itself."""
    k = len(samples[0])
    flat_prompts = [p for p in prompts for _ in range(k)]
    flat = [s for group in samples for s in group]
    control = torch.tensor([oracle(p, s) for p, s in zip(flat_prompts, flat, strict=True)])
    control = control.view(len(prompts), k)
    member_rewards = [
        rewards(Path(r.path), flat_prompts, flat, setup.max_length).view(len(prompts), k)
        for r in report.ranking
    ]
    sizes = [n for n in BON_SIZES if n <= k]
    curves: dict[str, list[float]] = {"oracle": bon_curve(control, control, sizes)}
    for m, path in sorted(warm.items()):
        proxy = (
            member_rewards[0]
            if m == 1
            else rewards(path, flat_prompts, flat, setup.max_length).view(len(prompts), k)
        )
        curves[f"WARM M={m}"] = bon_curve(proxy, control, sizes)
        if m > 1:
            ensemble = torch.stack(member_rewards[:m]).mean(0)
            curves[f"ENS M={m}"] = bon_curve(ensemble, control, sizes)
    return {"n": sizes, "prompts": len(prompts), "samples": k, "curves": curves}


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """P(a_i > b_i) over paired samples, a tie counting one half."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need two equal non-empty sequences, got {len(a)} and {len(b)}")
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)) / len(a)
