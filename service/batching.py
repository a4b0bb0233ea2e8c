"""The batching policy, as pure functions: which waiting items go into the next forward
pass (`form_batch`), and whether they go now or wait for company (`next_batch`).

The cost of a forward pass is modelled as `overhead + padded tokens`, where padded tokens
are (items x longest item) and `overhead` is the fixed cost of a pass expressed in tokens
(measured at warm-up: large on a GPU, small on a CPU). Among the batches that contain the
oldest waiting item (so nothing starves and waiting is first-come first-served) and fit the
size and token limits, the one scoring the most real tokens per unit of cost is chosen.
Candidates are runs of items of neighbouring lengths, so mixed-length traffic is grouped
by length instead of padded to its longest item.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class BatchLimits:
    """What one forward pass may hold, and what it costs beyond its tokens."""

    max_batch_size: int
    max_batch_tokens: int
    overhead_tokens: float = 0.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_batch_tokens < 1 or self.overhead_tokens < 0:
            raise ValueError(f"invalid batch limits: {self}")


def padded_tokens(lengths: Sequence[int]) -> int:
    """Tokens a batch occupies once padded to its longest item."""
    return max(lengths, default=0) * len(lengths)


def efficiency(lengths: Sequence[int], overhead_tokens: float) -> float:
    """Real tokens scored per unit of cost (`overhead_tokens + padded tokens`)."""
    cost = overhead_tokens + padded_tokens(lengths)
    return sum(lengths) / cost if cost else 0.0


def form_batch(lengths: Sequence[int], limits: BatchLimits) -> list[int]:
    """Indices of the next batch; `lengths` are waiting items' token counts, oldest first.

    The oldest item (index 0) is always in the batch. The result is sorted by length, then
    by age; an item longer than the token budget on its own goes alone. Ties in efficiency
    go to the larger batch, then to the shorter items.
    """
    if not lengths:
        return []
    order = np.lexsort((np.arange(len(lengths)), np.asarray(lengths)))
    sorted_lengths = np.asarray(lengths, dtype=np.float64)[order]
    prefix = np.concatenate(([0.0], np.cumsum(sorted_lengths)))
    anchor = int(np.flatnonzero(order == 0)[0])
    size = limits.max_batch_size
    # Candidate windows [start, stop) of the length-sorted items that contain the anchor.
    starts = np.arange(max(0, anchor - size + 1), anchor + 1)[:, None]
    stops = np.arange(anchor + 1, min(len(lengths), anchor + size) + 1)[None, :]
    count = stops - starts
    padded = sorted_lengths[stops - 1] * count
    valid = (count <= size) & (padded <= limits.max_batch_tokens)
    if not valid.any():
        return [0]
    score = np.where(
        valid, (prefix[stops] - prefix[starts]) / (limits.overhead_tokens + padded), -1
    )
    best = score >= score.max() * (1 - 1e-12)
    count_of_best = np.where(best, count, 0)
    row, col = np.unravel_index(int(np.argmax(count_of_best == count_of_best.max())), score.shape)
    start, stop = int(starts[row, 0]), int(stops[0, col])
    return [int(i) for i in order[start:stop]]


def is_full(lengths: Sequence[int], limits: BatchLimits) -> bool:
    """Whether no further item could join a batch of these lengths (none as long as its
    longest would fit)."""
    return (
        len(lengths) >= limits.max_batch_size
        or max(lengths) * (len(lengths) + 1) > limits.max_batch_tokens
    )


@dataclass(frozen=True)
class Dispatch:
    """What the scheduler does with the waiting items now."""

    batch: list[int]  # indices of the items to stage now, as form_batch orders them; [] waits
    wait_s: float = 0.0  # when waiting: how long until the oldest item may wait no longer
    split: bool = False  # the batch is one piece of work split across free threads


def next_batch(
    lengths: Sequence[int],
    limits: BatchLimits,
    *,
    waited_s: float,
    max_wait_s: float,
    busy: bool,
    due: bool,
    pieces: int,
) -> Dispatch:
    """Stage a batch now, or wait up to `max_wait_s` (counted from the oldest item, waiting
    `waited_s` so far) for items to fill it.

    A batch goes now when it is full, when the oldest item has waited long enough, when no
    model worker is free (it is staged, and re-formed if better company arrives before a
    worker takes it), or when it is `due` (the rest of work already split). When every
    waiting item fits one batch and `pieces` > 1 workers are free, it is split: the first
    piece holds about 1/pieces of the items (the shortest, by `form_batch`), and the rest is
    due.
    """
    if not lengths:
        return Dispatch([])
    chosen = form_batch(lengths, limits)
    full = is_full([lengths[i] for i in chosen], limits)
    if not (busy or due or full) and waited_s < max_wait_s:
        return Dispatch([], wait_s=max_wait_s - waited_s)
    if pieces > 1 and len(chosen) == len(lengths) and len(chosen) > 1:
        piece = replace(limits, max_batch_size=max(1, len(chosen) // pieces))
        return Dispatch(form_batch(lengths, piece), split=True)
    return Dispatch(chosen)
