"""Linear mode connectivity (WARM, section 3): accuracy along weight vs prediction averaging.

For members A and B (the first two inputs) and each lambda, preference accuracy of
  WA:    the model with weights (1 - lambda) * theta_A + lambda * theta_B,
  ENS:   the reward (1 - lambda) * r_A + lambda * r_B (prediction ensembling),
  chord: (1 - lambda) * acc_A + lambda * acc_B,
plus how often WA and ENS agree on which response wins. WA at or above the chord (no
barrier) means the members are linearly mode connected and weight averaging is safe; for
M > 2 inputs the uniform WA of all members is compared with their uniform ENS as well.

Memory: every member's full state dict is held in fp32, plus one interpolated copy and one
model. That is fine for the diagnostic-sized models this runs on; it is not the streaming
path that `warm-merge build` takes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file

from merger.checkpoints import Checkpoint, check_compatible, open_checkpoint
from merger.errors import MergeError
from merger.formatting import DEFAULT_SEPARATOR, render
from merger.methods import average
from merger.preferences import Preference
from merger.scoring import batch_texts, load_reward_model, score_batches
from merger.writer import atomic_file

JSON_NAME = "diagnose.json"
PNG_NAME = "diagnose.png"

State = dict[str, torch.Tensor]


class MemberResult(BaseModel):
    """One input checkpoint and its preference accuracy."""

    path: str
    accuracy: float


class CurvePoint(BaseModel):
    """WA, ENS and the chord at one interpolation coefficient between members A and B."""

    lam: float = Field(description="Interpolation coefficient: 0 is member A, 1 is member B.")
    wa_accuracy: float = Field(description="Accuracy of the weight average.")
    ens_accuracy: float = Field(description="Accuracy of the reward ensemble.")
    chord: float = Field(description="(1 - lam) * acc_A + lam * acc_B.")
    agreement: float = Field(description="Fraction of pairs where WA and ENS pick the same side.")


class UniformResult(BaseModel):
    """Uniform WA of all M members against their uniform ENS."""

    members: int
    wa_accuracy: float
    ens_accuracy: float
    agreement: float


class Verdict(BaseModel):
    """Whether averaging loses on one evaluation set: the uniform WA of all members against
    their ENS and against the best member, with the standard error of WA - best."""

    name: str = Field(description="The evaluation set (its file name).")
    pairs: int
    wa_accuracy: float
    ens_accuracy: float
    best_member: int = Field(description="Index of the most accurate member.")
    best_accuracy: float
    standard_error: float = Field(
        description="Of WA - best accuracy, from the pairs' paired differences."
    )
    loses: bool = Field(description="WA is more than two standard errors below the best member.")


class Diagnosis(BaseModel):
    """The whole diagnostic: members, the A-B curve and, for M > 2, the uniform comparison."""

    pairs: int = Field(description="Number of preference pairs scored.")
    max_length: int = Field(description="Token budget per text (longer texts are truncated).")
    members: list[MemberResult]
    curve: list[CurvePoint]
    barrier: float = Field(description="Max of chord - WA accuracy; <= 0: linearly connected.")
    uniform: UniformResult | None = None
    verdicts: list[Verdict] = Field(default_factory=list, description="One per evaluation set.")


def correct(margins: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 where the chosen response wins, 0.5 for a tie, 0 where it loses."""
    return (margins > 0).double() + 0.5 * (margins == 0).double()


def verdict(
    name: str, wa: torch.Tensor, ens: torch.Tensor, members: Sequence[torch.Tensor]
) -> Verdict:
    """The verdict on one set from the margins (chosen - rejected) of the uniform WA, the
    ENS and each member. The standard error of WA - best is that of the mean of the pairs'
    paired differences (sample std / sqrt(n)); WA loses when it is more than two of them
    below the best member (with a zero standard error: whenever it is below)."""
    n = wa.numel()
    if n == 0 or ens.shape != wa.shape or any(m.shape != wa.shape for m in members) or not members:
        raise ValueError("margins of the same non-empty pairs for WA, ENS and every member")
    accuracies = [float(correct(m).mean()) for m in members]
    best = max(range(len(members)), key=lambda i: (accuracies[i], -i))
    diff = correct(wa) - correct(members[best])
    se = float(diff.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    wa_accuracy = float(correct(wa).mean())
    return Verdict(
        name=name,
        pairs=n,
        wa_accuracy=wa_accuracy,
        ens_accuracy=float(correct(ens).mean()),
        best_member=best,
        best_accuracy=accuracies[best],
        standard_error=se,
        loses=wa_accuracy < accuracies[best] - 2 * se,
    )


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Fraction of pairs with chosen reward > rejected reward; a tie counts 0.5."""
    if chosen.shape != rejected.shape or chosen.numel() == 0:
        raise ValueError(f"need two equal non-empty shapes, got {chosen.shape}, {rejected.shape}")
    return float(correct(chosen - rejected).mean())


def margin_accuracy(margins: torch.Tensor) -> float:
    """Fraction of reward margins (chosen - rejected) above 0; a tie counts 0.5."""
    return pairwise_accuracy(margins, torch.zeros_like(margins))


def agreement(margins_a: torch.Tensor, margins_b: torch.Tensor) -> float:
    """Fraction of pairs whose margins have the same sign (0 is a sign of its own)."""
    if margins_a.shape != margins_b.shape or margins_a.numel() == 0:
        raise ValueError(
            f"need two equal non-empty shapes, got {margins_a.shape}, {margins_b.shape}"
        )
    return float((torch.sign(margins_a) == torch.sign(margins_b)).double().mean())


def chord(acc_a: float, acc_b: float, lam: float) -> float:
    """The straight line between the members' accuracies: (1 - lam) * acc_a + lam * acc_b."""
    return (1.0 - lam) * acc_a + lam * acc_b


def lambda_grid(steps: int) -> list[float]:
    """`steps` evenly spaced coefficients from 0 to 1, both ends exact."""
    if steps < 2:
        raise ValueError(f"steps is {steps}: the grid needs at least its two ends")
    return [i / (steps - 1) for i in range(steps)]


def average_states(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """sum_i w_i * state_i (weights sum to 1) in fp32; non-floating tensors must agree."""
    out: State = {}
    for name, ref in states[0].items():
        tensors = [s[name] for s in states]
        if ref.is_floating_point():
            out[name] = average(tensors, weights, torch.float32)
        elif all(torch.equal(ref, t) for t in tensors[1:]):
            out[name] = ref
        else:
            raise MergeError(f"{ref.dtype} tensor {name} differs between members; cannot average")
    return out


def _load_state(ckpt: Checkpoint) -> State:
    state: State = {}
    for file in ckpt.weight_files:
        state.update(load_file(str(file)))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _load_into(model: Any, state: State, source: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # torch lists every missing / unexpected key in one message
        raise MergeError(
            f"{source}: weights do not fit the model built from config.json ({exc})"
        ) from exc


def _validate_args(
    checkpoints: list[Path], data: Sequence[Preference], lambdas: list[float]
) -> None:
    if len(checkpoints) < 2:
        raise ValueError(f"diagnose needs at least two checkpoints, got {len(checkpoints)}")
    if not data:
        raise ValueError("no preference pairs to score")
    if not lambdas:
        raise ValueError("no lambdas: give at least one interpolation coefficient")
    for lam in lambdas:
        if not (math.isfinite(lam) and 0.0 <= lam <= 1.0):
            raise ValueError(f"lambda {lam} is outside [0, 1]")


def diagnose(
    checkpoints: list[Path],
    data: Sequence[Preference],
    *,
    lambdas: list[float],
    batch_size: int = 16,
    max_length: int = 256,
    separator: str = DEFAULT_SEPARATOR,
    evaluations: Mapping[str, Sequence[Preference]] | None = None,
) -> Diagnosis:
    """Score members, WA and ENS along lambda (A to B) and, for M > 2, uniform WA vs ENS;
    and for each of `evaluations` (name -> pairs; e.g. an ID and a shifted split) the
    verdict of the uniform WA of all members against their ENS and the best member."""
    from transformers import AutoTokenizer

    _validate_args(checkpoints, data, lambdas)
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size ({batch_size}) and max_length ({max_length}) must be >= 1")
    members = [open_checkpoint(p) for p in checkpoints]
    check_compatible(members, None, allow_multi_head=False)
    first = members[0]
    if first.config is None:
        raise MergeError(f"{first.path}: diagnose needs model directories (config.json, tokenizer)")

    tokenizer = AutoTokenizer.from_pretrained(first.path)
    model = load_reward_model(first.path)

    def batches_of(pairs: Sequence[Preference]) -> list[dict[str, torch.Tensor]]:
        texts = [
            render(tokenizer, prompt=p.prompt, response=r, separator=separator)
            for p, r in [*((p, p.chosen) for p in pairs), *((p, p.rejected) for p in pairs)]
        ]
        return batch_texts(tokenizer, texts, batch_size, max_length)

    batches = batches_of(data)
    n = len(data)

    def score(
        state: State, source: str, on: list[dict[str, torch.Tensor]] = batches
    ) -> torch.Tensor:
        _load_into(model, state, source)
        return score_batches(model, on)  # [2N]: chosen rewards, then rejected

    def acc(rewards: torch.Tensor) -> float:
        return pairwise_accuracy(rewards[:n], rewards[n:])

    def margins(rewards: torch.Tensor) -> torch.Tensor:
        return rewards[:n] - rewards[n:]

    states = [_load_state(m) for m in members]
    rewards = [score(s, str(m.path)) for s, m in zip(states, members, strict=True)]
    accs = [acc(r) for r in rewards]

    curve = []
    for lam in lambdas:
        wa = score(average_states(states[:2], [1.0 - lam, lam]), f"WA at lambda={lam}")
        ens = (1.0 - lam) * rewards[0] + lam * rewards[1]
        curve.append(
            CurvePoint(
                lam=lam,
                wa_accuracy=acc(wa),
                ens_accuracy=acc(ens),
                chord=chord(accs[0], accs[1], lam),
                agreement=agreement(margins(wa), margins(ens)),
            )
        )

    uniform = None
    if len(members) > 2:
        wa = score(average_states(states, [1.0 / len(members)] * len(members)), "uniform WA")
        ens = torch.stack(rewards).mean(dim=0)
        uniform = UniformResult(
            members=len(members),
            wa_accuracy=acc(wa),
            ens_accuracy=acc(ens),
            agreement=agreement(margins(wa), margins(ens)),
        )

    verdicts = []
    uniform_wa = average_states(states, [1.0 / len(members)] * len(members))
    for name, pairs in (evaluations or {}).items():
        if not pairs:
            raise ValueError(f"{name}: no preference pairs to evaluate on")
        on, k = batches_of(pairs), len(pairs)
        member_margins = [
            (r := score(s, str(m.path), on))[:k] - r[k:]
            for s, m in zip(states, members, strict=True)
        ]
        wa_rewards = score(uniform_wa, "uniform WA", on)
        ens_margins = torch.stack(member_margins).mean(dim=0)
        verdicts.append(verdict(name, wa_rewards[:k] - wa_rewards[k:], ens_margins, member_margins))

    return Diagnosis(
        pairs=n,
        max_length=max_length,
        members=[
            MemberResult(path=str(m.path), accuracy=a) for m, a in zip(members, accs, strict=True)
        ],
        curve=curve,
        barrier=max(p.chord - p.wa_accuracy for p in curve),
        uniform=uniform,
        verdicts=verdicts,
    )


def _plot(diag: Diagnosis, fh: IO[bytes]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on an Agg canvas: no pyplot, so no global backend or figure registry.
    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lams = [p.lam for p in diag.curve]
    ax.plot(lams, [p.wa_accuracy for p in diag.curve], "o-", label="WA (weights)")
    ax.plot(lams, [p.ens_accuracy for p in diag.curve], "s--", label="ENS (rewards)")
    ax.plot(lams, [p.chord for p in diag.curve], ":", color="gray", label="chord")
    ends = [diag.members[0].accuracy, diag.members[1].accuracy]
    ax.scatter([0.0, 1.0], ends, marker="*", s=160, color="black", zorder=3, label="members A, B")
    ax.set_xlabel(r"$\lambda$  (0 = member A, 1 = member B)")
    ax.set_ylabel(f"pairwise accuracy ({diag.pairs} pairs)")
    mean_agree = sum(p.agreement for p in diag.curve) / len(diag.curve)
    title = f"WA vs ENS: mean agreement {mean_agree:.3f}, barrier {diag.barrier:+.3f}"
    if diag.uniform is not None:
        title += f"\nuniform M={diag.uniform.members}: agreement {diag.uniform.agreement:.3f}"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(fh, format="png", dpi=120)


def write_report(diag: Diagnosis, out_dir: Path) -> tuple[Path, Path]:
    """Write diagnose.json and diagnose.png into out_dir, each atomically; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / JSON_NAME, out_dir / PNG_NAME
    with atomic_file(json_path) as fh:
        fh.write((diag.model_dump_json(indent=2) + "\n").encode())
    with atomic_file(png_path) as fh:
        _plot(diag, fh)
    return json_path, png_path
