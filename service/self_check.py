"""The startup self-check: the artifact's golden set scored through the serving path and held
to the rewards the artifact recorded (`merger.calibration`).

Each golden response is rendered and tokenised by the service's encoder and submitted to the
scheduler as its own request, so it runs on the served backend, dtype, device and batching.
It fails when a reward moves past the tolerance of the trunk's dtype (`tolerance`), or when
a response no longer tokenises to the recorded length: the signature of a tokenizer or chat
template that is not the one the artifact was calibrated with, a doubled BOS, a changed
weight or head, or a kernel that computes something else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from merger.calibration import Calibration
from service.admission import Scheduler
from service.encoding import Encoder
from service.protocol import Item

log = logging.getLogger(__name__)

# How far a served reward may be from its recorded fp32 reward, by the trunk's dtype: in
# fp32, in reward units; in 16 bits, as a share of the reference rewards' std (16-bit
# rounding depends on the batch shapes and kernels: on the suite's models and MiniLM,
# measured up to 5.2% of the std between bf16 and fp32, 4.3% between the two backends in
# bf16, 2.8% across batches; benchmarks/RESULTS.md, "bf16 serving"; fp16 keeps 3 more
# mantissa bits). A wrong tokenizer, template or weight moves rewards by a sizeable share
# of their std.
ABSOLUTE = {"float32": 1e-4}
OF_SPREAD = {"bfloat16": 0.10, "float16": 0.02}
Mode = Literal["off", "warn", "fail"]
Status = Literal["passed", "failed", "warned", "skipped", "off"]


def tolerance(dtype: str, spread: float) -> float:
    """The largest |served - recorded| reward allowed for a trunk in `dtype`, where `spread`
    is the std of the reference rewards."""
    if dtype in ABSOLUTE:
        return ABSOLUTE[dtype]
    return OF_SPREAD[dtype] * spread


@dataclass(frozen=True)
class SelfCheck:
    """What the self-check found."""

    status: Status
    checked: int = 0
    max_deviation: float = 0.0
    tolerance: float = 0.0
    detail: str = ""  # the worst item, or why nothing was checked
    seconds: float = 0.0  # from the first submission to the last reward


class SelfCheckFailed(Exception):
    """The served model does not score its golden set as recorded."""


async def run_self_check(
    scheduler: Scheduler,
    encoder: Encoder,
    calibration: Calibration,
    dtype: str,
    *,
    reward_index: int = 0,
    override: float | None = None,
    timeout_s: float = 300.0,
) -> SelfCheck:
    """Score every golden response through `scheduler` and compare with the recorded rewards
    (`override`: a tolerance in reward units instead of the dtype's)."""
    golden = [g for g in calibration.golden if g.n_tokens <= encoder.max_length]
    if not golden:
        return SelfCheck("skipped", detail="no golden response fits within max_length")
    items = [Item(prompt=g.prompt, response=g.response) for g in golden]
    encoded = encoder.encode(items, calibration.rendering.truncation_side)
    started = time.monotonic()
    jobs = [scheduler.submit([e.ids], started + timeout_s) for e in encoded]
    outputs = await asyncio.gather(*(job.future for job in jobs))
    seconds = time.monotonic() - started
    served = np.array([float(o[0][reward_index]) for o in outputs])
    recorded = np.array([g.reward for g in golden])
    deviation = np.abs(served - recorded)
    deviation[~np.isfinite(served)] = np.inf
    bound = override if override is not None else tolerance(dtype, calibration.rewards.std)
    worst = int(np.argmax(deviation))
    lengths = [
        (i, len(e.ids), g.n_tokens) for i, (e, g) in enumerate(zip(encoded, golden, strict=True))
    ]
    moved = [(i, got, want) for i, got, want in lengths if got != want]
    if moved:
        i, got, want = moved[0]
        detail = (
            f"golden[{i}] tokenises to {got} tokens, recorded {want} "
            f"({len(moved)} of {len(golden)} differ): not the tokenizer or chat template "
            "the artifact was calibrated with"
        )
        return SelfCheck("failed", len(golden), float(deviation.max()), bound, detail, seconds)
    detail = (
        f"golden[{worst}] ({golden[worst].n_tokens} tokens): served {served[worst]:.6g}, "
        f"recorded {recorded[worst]:.6g}, |difference| {deviation[worst]:.3g}"
    )
    status: Status = "passed" if deviation[worst] <= bound else "failed"
    return SelfCheck(status, len(golden), float(deviation[worst]), bound, detail, seconds)


def verdict(result: SelfCheck, mode: Mode) -> SelfCheck:
    """Log the result; a failure is 'failed' in mode 'fail' (the caller stops: its detail is
    the one line to log) and 'warned' in mode 'warn'."""
    if result.status == "passed":
        log.info(
            "self-check passed: %d golden responses within %.3g (max |difference| %.3g) in %.2f s",
            result.checked, result.tolerance, result.max_deviation, result.seconds,
        )  # fmt: skip
        return result
    if result.status != "failed":
        log.info("self-check %s: %s", result.status, result.detail)
        return result
    line = (
        f"self-check failed: {result.detail}; tolerance {result.tolerance:.3g} over "
        f"{result.checked} golden responses"
    )
    if mode == "fail":
        return replace(result, detail=line)
    log.warning("%s (serving anyway: --self-check warn)", line)
    return replace(result, status="warned")
