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
from service.admission import Job, Scheduler
from service.encoding import Encoder
from service.errors import ServiceError
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


def tolerance(dtype: str, spread: float, *, tf32: bool = False) -> float:
    """The largest |served - recorded| reward allowed for a trunk in `dtype`, where `spread`
    is the std of the reference rewards; an fp32 trunk whose matrix products run in TF32
    (Ampere and later GPUs, `device.DevicePlan.tf32`) keeps fp16's 10-bit mantissa there and
    is held to fp16's bound."""
    if dtype == "float32" and tf32:
        dtype = "float16"
    if dtype in ABSOLUTE:
        return ABSOLUTE[dtype]
    return OF_SPREAD[dtype] * spread


@dataclass(frozen=True)
class SelfCheck:
    """What the self-check found."""

    status: Status
    checked: int = 0
    max_deviation: float | None = 0.0  # None: not measured, or a served reward not finite
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
    tf32: bool = False,
    override: float | None = None,
    timeout_s: float = 300.0,
) -> SelfCheck:
    """Score every golden response through `scheduler` and compare with the recorded rewards
    (`override`: a tolerance in reward units instead of the dtype's). Anything that keeps the
    golden set from being scored (a template refusing it, a failing forward, `timeout_s`
    passing) is a failed check, not an exception."""
    spread = calibration.rewards.std
    bound = override if override is not None else tolerance(dtype, spread, tf32=tf32)
    golden = [g for g in calibration.golden if g.n_tokens <= encoder.max_length]
    if not golden:
        return SelfCheck("skipped", detail="no golden response fits within max_length")
    items = [Item(prompt=g.prompt, response=g.response) for g in golden]
    started = time.monotonic()
    jobs: list[Job] = []
    try:
        encoded = encoder.encode(items, calibration.rendering.truncation_side)
        scoring = _score_all(scheduler, [e.ids for e in encoded], started + timeout_s, jobs)
        outputs = await asyncio.wait_for(scoring, timeout_s)
    except Exception as error:  # every way of not scoring the golden set fails the check
        for job in jobs:  # withdraw what is left (a timeout has cancelled their futures)
            if job.future.cancelled() or not job.future.done():
                scheduler.cancel(job, "cancelled")
        what = f"timed out after {timeout_s:g} s" if isinstance(error, TimeoutError) else error
        detail = f"the golden set could not be scored: {what}"
        return SelfCheck("failed", 0, None, bound, detail, time.monotonic() - started)
    seconds = time.monotonic() - started
    served = np.array([float(o[0][reward_index]) for o in outputs])
    recorded = np.array([g.reward for g in golden])
    deviation = np.abs(served - recorded)
    deviation[~np.isfinite(deviation)] = np.inf
    worst = int(np.argmax(deviation))
    largest = float(deviation[worst]) if np.isfinite(deviation[worst]) else None
    pairs = zip(encoded, golden, strict=True)
    moved = [
        (i, len(e.ids), g.n_tokens) for i, (e, g) in enumerate(pairs) if len(e.ids) != g.n_tokens
    ]
    if moved:
        i, got, want = moved[0]
        detail = (
            f"golden[{i}] tokenises to {got} tokens, recorded {want} "
            f"({len(moved)} of {len(golden)} differ): not the tokenizer or chat template "
            "the artifact was calibrated with"
        )
        return SelfCheck("failed", len(golden), largest, bound, detail, seconds)
    detail = (
        f"golden[{worst}] ({golden[worst].n_tokens} tokens): served {served[worst]:.6g}, "
        f"recorded {recorded[worst]:.6g}, |difference| {deviation[worst]:.3g}"
    )
    status: Status = "passed" if deviation[worst] <= bound else "failed"
    return SelfCheck(status, len(golden), largest, bound, detail, seconds)


async def _score_all(
    scheduler: Scheduler, sequences: list[list[int]], deadline: float, jobs: list[Job]
) -> list[np.ndarray]:
    """Each sequence as its own request (appended to `jobs` as submitted); where the queue is
    full, what is in it finishes first."""
    for ids in sequences:
        try:
            jobs.append(scheduler.submit([ids], deadline))
        except ServiceError:  # the queue's bounds: wait for the golden items already in it
            await asyncio.gather(*(job.future for job in jobs), return_exceptions=True)
            jobs.append(scheduler.submit([ids], deadline))
    return list(await asyncio.gather(*(job.future for job in jobs)))


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
