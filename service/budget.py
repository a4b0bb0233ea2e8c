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

from service.backends.base import Backend, OutOfMemory
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
    """Warm the model up, time forwards of 1, 2, 4, ... items of CALIBRATION_LENGTH tokens
    on `threads` CPU threads (None: the backend's own), each twice, its best time kept, then
    `choose_budget`; on an accelerator, confirm the budget with items of the longest length.

    The budget is never more than a batch that ran: the doubling stops at the first size
    that runs out of memory (the cache is freed), and the confirmation runs a full budget of
    `encoder.max_length`-token items (attention's memory grows with the length), halving the
    budget until it fits. Raises `OutOfMemory` when one item of the longest length does not
    fit.
    """
    length = min(CALIBRATION_LENGTH, encoder.max_length)
    ids = filler(encoder, length)
    sizes = [1]
    while sizes[-1] * 2 <= max_batch_size and sizes[-1] * 2 * len(ids) <= max_batch_tokens:
        sizes.append(sizes[-1] * 2)
    restore = torch.get_num_threads()  # a forward on `threads` sets this thread's count
    try:
        # First call: lazy initialisation, a ragged batch (padding and masks) no larger than
        # one item.
        backend.forward([ids[: max(1, length // 2)], ids[: max(1, length // 4)]], threads)
        seconds: dict[int, float] = {}
        ceiling = max_batch_tokens
        for size in sizes:
            try:
                seconds[size] = min(timed(backend, [ids] * size, threads) for _ in range(2))
            except OutOfMemory:
                backend.free_memory()
                ceiling = (size // 2) * len(ids)
                break
        if not seconds:
            raise OutOfMemory(f"one item of {len(ids)} tokens does not fit the device's memory")
        cpu = backend.info.device == "cpu"
        tolerance = TUNE_TOLERANCE["cpu" if cpu else "accelerator"]
        chosen = choose_budget(seconds, len(ids), ceiling, encoder.max_length, tolerance=tolerance)
        budget, confirmed = chosen.batch_tokens, ""
        if not cpu:  # host memory is not what limits a CPU's batches
            longest = filler(encoder, encoder.max_length)
            budget, rate = confirm(backend, longest, budget, max_batch_size, threads)
            confirmed = f"; {len(longest)}-token items: {rate:.1f}/s"
    finally:
        torch.set_num_threads(restore)
    log.info(
        "warm-up over %d-token items on %s: %s%s; overhead %.0f tokens, batch budget %d tokens",
        len(ids),
        "every thread" if threads is None else f"{threads} thread(s)",
        ", ".join(f"{size}: {rate:.1f}/s" for size, rate in rate_of(seconds).items()),
        confirmed,
        chosen.overhead_tokens,
        budget,
    )
    return Calibration(overhead_tokens=chosen.overhead_tokens, batch_tokens=budget)


def filler(encoder: Encoder, length: int) -> list[int]:
    """Token ids of one item of `length` tokens (fewer only where the model's limit is lower),
    rendered as the service renders a request."""
    text = " ".join(["warm"] * (2 * length))
    return list(encoder.encode_texts([text], "right")[0].ids[:length])


def timed(backend: Backend, sequences: list[list[int]], threads: int | None) -> float:
    """Seconds one forward of `sequences` takes."""
    start = time.perf_counter()
    backend.forward(sequences, threads)
    return time.perf_counter() - start


def confirm(
    backend: Backend,
    longest: list[int],
    budget: int,
    max_batch_size: int,
    threads: int | None,
) -> tuple[int, float]:
    """The largest budget, at most `budget`, that a batch of `longest` items fills and that
    fits the device's memory (never below one item), and that batch's items per second."""
    while True:
        count = max(1, min(max_batch_size, budget // len(longest)))
        try:
            seconds = timed(backend, [longest] * count, threads)
        except OutOfMemory:
            backend.free_memory()
            if count == 1:
                raise OutOfMemory(
                    f"one item of {len(longest)} tokens does not fit the device's memory: "
                    "lower --max-length"
                ) from None
            budget = max(len(longest), (count // 2) * len(longest))
            continue
        return max(budget, len(longest)), count / seconds


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
    is within `tolerance` (a fraction) of the best one: `max_batch_tokens` (the configured
    budget, or the largest batch that fit) when that is the largest size timed (on a GPU the
    largest batch usually wins), else that many items of `length` tokens, but never below
    `max_length` (one item of any length fits).
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
