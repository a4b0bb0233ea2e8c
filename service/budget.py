"""The batch budget: the fixed cost of a forward pass and the padded-token budget past
which larger batches stop paying, measured on the loaded model at warm-up.

`calibrate` times forwards; `choose_budget` turns the timings into the two numbers
`batching.form_batch` works with (`BatchLimits.overhead_tokens`, `max_batch_tokens`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from service.backends.base import Backend
from service.encoding import Encoder

log = logging.getLogger(__name__)

CALIBRATION_LENGTH = 128  # tokens per timed item
# How close to the best timed throughput the chosen batch must come. On a CPU the curve is
# flat past a few items and timings on a shared host are noisy, so a tight tolerance would
# pick a batch by noise, and a large batch costs latency and side-by-side forwards for
# nothing; accelerator timings are steady and their curve keeps rising.
TUNE_TOLERANCE = {"cpu": 0.10, "accelerator": 0.03}


@dataclass(frozen=True)
class Calibration:
    """What warm-up measured about forward passes on this model and device."""

    overhead_tokens: float  # fixed cost of one forward pass, in padded tokens
    batch_tokens: int  # padded-token budget past which throughput stops improving


def calibrate(
    backend: Backend,
    encoder: Encoder,
    max_batch_size: int,
    max_batch_tokens: int,
    *,
    threads: int | None = None,
) -> Calibration:
    """Warm the model up and time forwards of 1, 2, 4, ... items of CALIBRATION_LENGTH tokens
    on `threads` CPU threads (None: the backend's own), each twice, its best time kept, then
    `choose_budget`."""
    text = " ".join(["warm"] * (4 * CALIBRATION_LENGTH))
    length = min(CALIBRATION_LENGTH, encoder.max_length)
    ids = encoder.encode_texts([text], "right")[0].ids[:length]
    sizes = [1]
    while sizes[-1] * 2 <= max_batch_size and sizes[-1] * 2 * len(ids) <= max_batch_tokens:
        sizes.append(sizes[-1] * 2)
    restore = torch.get_num_threads()  # a forward on `threads` sets this thread's count
    try:
        # First calls: lazy initialisation, allocator growth.
        backend.forward([ids] * sizes[-1], threads)
        backend.forward([ids, ids[: max(1, length // 2)]], threads)
        seconds = {}
        for size in sizes:
            times = []
            for _ in range(2):
                start = time.perf_counter()
                backend.forward([ids] * size, threads)
                times.append(time.perf_counter() - start)
            seconds[size] = min(times)
    finally:
        torch.set_num_threads(restore)
    tolerance = TUNE_TOLERANCE["cpu" if backend.info.device == "cpu" else "accelerator"]
    calibration = choose_budget(
        seconds, len(ids), max_batch_tokens, encoder.max_length, tolerance=tolerance
    )
    log.info(
        "warm-up over %d-token items on %s: %s; overhead %.0f tokens, batch budget %d tokens",
        len(ids),
        "every thread" if threads is None else f"{threads} thread(s)",
        ", ".join(f"{size}: {rate:.1f}/s" for size, rate in rate_of(seconds).items()),
        calibration.overhead_tokens,
        calibration.batch_tokens,
    )
    return calibration


def rate_of(seconds: dict[int, float]) -> dict[int, float]:
    """Items per second of each batch size."""
    return {size: size / s for size, s in seconds.items()}


def choose_budget(
    seconds: dict[int, float],
    length: int,
    max_batch_tokens: int,
    max_length: int,
    *,
    tolerance: float,
) -> Calibration:
    """The fixed cost and the batch budget from the best time of each batch size.

    The overhead comes from a straight-line fit time = c0 + c1 * padded_tokens through the
    1-item and 8-item timings (c0 / c1). The budget is the smallest batch whose throughput
    is within `tolerance` (a fraction) of the best one: the configured budget when that is the
    largest size timed (on a GPU the largest batch usually wins), else that many items of
    `length` tokens, but never below `max_length` (one item of any length fits).
    """
    rates = rate_of(seconds)
    best = max(rates.values())
    chosen = min(size for size, rate in rates.items() if rate >= (1 - tolerance) * best)
    largest = max(seconds)
    if chosen == largest:
        budget = max_batch_tokens
    else:
        budget = min(max_batch_tokens, max(chosen * length, max_length))
    many = 8 if 8 in seconds else largest
    per_token = (seconds[many] - seconds[1]) / ((many - 1) * length) if many > 1 else 0.0
    if per_token <= 0:
        overhead = float(budget)  # batching is free at this size: favour full batches
    else:
        overhead = max(0.0, (seconds[1] - per_token * length) / per_token)
    return Calibration(overhead_tokens=overhead, batch_tokens=budget)
