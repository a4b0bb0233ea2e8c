"""The batching policy's pure parts (forming, dispatch, forward slots), against hand-computed
expectations."""

from __future__ import annotations

import random

import pytest

from service.batching import (
    BatchLimits,
    Dispatch,
    efficiency,
    form_batch,
    is_full,
    next_batch,
    padded_tokens,
)
from service.cores import CoreShare, Grant, OneForward

# --- batching -------------------------------------------------------------------------------


def test_padded_tokens_and_efficiency() -> None:
    assert padded_tokens([]) == 0
    assert padded_tokens([3, 5, 2]) == 15  # 5 * 3
    assert efficiency([3, 5, 2], 5) == 0.5  # (3+5+2) / (5 + 15) = 10/20
    assert efficiency([4, 4], 0) == 1.0  # 8 / 8
    assert efficiency([], 0) == 0.0  # zero cost -> 0, not a division error


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ((0, 10, 0.0), "max_batch_size"),
        ((1, 0, 0.0), "max_batch_tokens"),
        ((1, 10, -1.0), "overhead_tokens"),
    ],
)
def test_batch_limits_invalid(limits: tuple[int, int, float], expected: str) -> None:
    with pytest.raises(ValueError, match="invalid batch limits") as info:
        BatchLimits(*limits)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("lengths", "limits", "expected"),
    [
        # Nothing waiting; a lone item.
        ([], (4, 100, 0.0), []),
        ([5], (4, 100, 0.0), [0]),
        # Oldest (50) exceeds the 40-token budget: every window holds it -> it goes alone.
        ([50, 10, 10], (4, 40, 0.0), [0]),
        # Uniform 8s, overhead 0: every window scores 1.0 -> the largest (size 3), by age.
        ([8, 8, 8, 8, 8], (3, 1000, 0.0), [0, 1, 2]),
        ([8, 8, 8, 8, 8], (10, 1000, 0.0), [0, 1, 2, 3, 4]),
        # Token budget 24: count * 8 <= 24 -> count 3.
        ([8, 8, 8, 8, 8], (10, 24, 0.0), [0, 1, 2]),
        # Size 4 of ten uniform items.
        ([4] * 10, (4, 1000, 0.0), [0, 1, 2, 3]),
        # Overhead 0: {10} = 10/10 = 1 beats {5,10} = 15/20 = 0.75.
        ([10, 5], (4, 100, 0.0), [0]),
        # Oldest short: {5} = 5/5 = 1 beats {5,10} = 15/20.
        ([5, 10], (4, 100, 0.0), [0]),
        # Overhead 100: {10} = 10/110 = 0.091 < {5,10} = 15/120 = 0.125; sorted by length.
        ([10, 5], (4, 100, 100.0), [1, 0]),
        # Overhead 0: {10} = 1 > {8,10} = 18/20 > {6,8,10} = 24/30.
        ([10, 6, 8], (4, 100, 0.0), [0]),
        # Overhead 1000: 10/1010 = .0099 < 18/1020 = .0176 < 24/1030 = .0233.
        ([10, 6, 8], (4, 100, 1000.0), [1, 2, 0]),
        # Same, size 2: best of {10}, {8,10} -> {8,10}.
        ([10, 6, 8], (2, 100, 1000.0), [2, 0]),
        # Same, 20 tokens: 10 * count <= 20 -> count <= 2 -> {8,10}.
        ([10, 6, 8], (4, 20, 1000.0), [2, 0]),
    ],
)
def test_form_batch_limits_and_overhead(
    lengths: list[int], limits: tuple[int, int, float], expected: list[int]
) -> None:
    assert form_batch(lengths, BatchLimits(*limits)) == expected


def test_form_batch_groups_by_length() -> None:
    # Sorted: 10(1) 10(3) 100(0) 100(2) 100(4); the oldest is at sorted position 2; overhead 20.
    # Windows [start, stop) holding position 2, score = sum / (20 + max * count):
    #   (0,3) 120/320=.375  (0,4) 220/420=.524  (0,5) 320/520=.615
    #   (1,3) 110/220=.500  (1,4) 210/320=.656  (1,5) 310/420=.738
    #   (2,3) 100/120=.833  (2,4) 200/220=.909  (2,5) 300/320=.9375  <- best: the three 100s
    limits = BatchLimits(max_batch_size=5, max_batch_tokens=500, overhead_tokens=20)
    assert form_batch([100, 10, 100, 10, 100], limits) == [0, 2, 4]
    # Sorted: 10(0) 10(2) 10(4) 100(1) 100(3); oldest at position 0, windows (0, stop):
    #   {10} 10/30=.333  {10,10} 20/40=.5  {10x3} 30/50=.6  +100: 130/420=.31  +100: 230/520=.44
    assert form_batch([10, 100, 10, 100, 10], limits) == [0, 2, 4]


def test_form_batch_ties_go_to_larger_then_shorter() -> None:
    # Overhead 4: {4} = 4/(4+4) = 0.5 and {2,4} = 6/(4+8) = 0.5 tie -> larger batch.
    assert form_batch([4, 2], BatchLimits(2, 100, 4.0)) == [1, 0]
    # Overhead 5, sorted 4(2) 5(0) 10(1): {5} = 5/10 = .5, {4,5} = 9/(5+10) = .6,
    # {5,10} = 15/(5+20) = .6, {4,5,10} = 19/(5+30) = .543 -> the tied pair of shorter items.
    assert form_batch([5, 10, 4], BatchLimits(3, 100, 5.0)) == [2, 0]


def test_form_batch_sorted_by_length_then_age() -> None:
    # Overhead 1000, sorted 3(1) 3(3) 7(0) 7(2): all four = 20/(1000+28) = .01946 beats
    # 17/1021 = .01665 (3,7,7) and 14/1014 = .0138 (7,7) -> everything, by length then age.
    assert form_batch([7, 3, 7, 3], BatchLimits(4, 1000, 1000.0)) == [1, 3, 0, 2]


def _reference_batch(lengths: list[int], limits: BatchLimits) -> list[int]:
    """Brute force of the documented rule over windows of the length-sorted items."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    anchor = order.index(0)
    best: tuple[float, int, int] | None = None
    best_window = [0]
    for start in range(anchor + 1):
        for stop in range(anchor + 1, len(order) + 1):
            window = [lengths[i] for i in order[start:stop]]
            too_big = len(window) > limits.max_batch_size
            if too_big or padded_tokens(window) > limits.max_batch_tokens:
                continue
            key = (efficiency(window, limits.overhead_tokens), len(window), -start)
            if best is None or key > best:
                best, best_window = key, order[start:stop]
    return best_window


@pytest.mark.parametrize("seed", range(5))
def test_form_batch_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(40):
        lengths = [rng.choice([3, 7, 20, 64, 65, 128]) for _ in range(rng.randint(1, 12))]
        limits = BatchLimits(rng.randint(1, 6), rng.choice([50, 128, 300]), rng.choice([0, 30]))
        batch = form_batch(lengths, limits)
        assert 0 in batch and len(batch) <= limits.max_batch_size
        if len(batch) > 1:
            assert padded_tokens([lengths[i] for i in batch]) <= limits.max_batch_tokens
        assert batch == _reference_batch(lengths, limits), (lengths, limits)


LIMITS = BatchLimits(max_batch_size=4, max_batch_tokens=100)


def test_is_full_by_count_or_by_the_next_item_of_the_longest_length() -> None:
    assert is_full([1, 1, 1, 1], LIMITS)  # four items: the size limit
    assert not is_full([10, 10, 10], LIMITS)  # a fourth of 10 tokens still fits (40)
    assert is_full([40, 10], LIMITS)  # a third item padded to 40: 3 x 40 = 120 > 100
    assert not is_full([30, 10], LIMITS)  # 3 x 30 = 90 still fits


def test_a_batch_that_can_still_grow_waits_for_the_rest_of_max_wait() -> None:
    got = next_batch(
        [5, 5], LIMITS, waited_s=0.002, max_wait_s=0.005, busy=False, due=False, pieces=1
    )
    assert got == Dispatch([], wait_s=pytest.approx(0.003))


@pytest.mark.parametrize(
    ("lengths", "waited_s", "busy", "due"),
    [
        ([5, 5], 0.005, False, False),  # the oldest item waited long enough
        ([5, 5], 0.0, True, False),  # no worker free: staged, re-formed if company comes
        ([5, 5], 0.0, False, True),  # the rest of split work
        ([5, 5, 5, 5], 0.0, False, False),  # full
    ],
)
def test_a_batch_goes_now_when(lengths: list[int], waited_s: float, busy: bool, due: bool) -> None:
    got = next_batch(
        lengths, LIMITS, waited_s=waited_s, max_wait_s=0.005, busy=busy, due=due, pieces=1
    )
    assert got == Dispatch(list(range(len(lengths))))


def test_work_that_fits_one_batch_is_split_one_piece_per_free_worker() -> None:
    # Three waiting items, two pieces: the first piece holds 3 // 2 = 1 item, the oldest.
    got = next_batch(
        [5, 5, 5], LIMITS, waited_s=1.0, max_wait_s=0.005, busy=False, due=False, pieces=2
    )
    assert got == Dispatch([0], split=True)
    # More work than one batch holds is not split: the batch goes whole.
    five = [1, 1, 1, 1, 1]
    got = next_batch(five, LIMITS, waited_s=1.0, max_wait_s=0.005, busy=False, due=False, pieces=2)
    assert got == Dispatch([0, 1, 2, 3])
    assert next_batch([], LIMITS, waited_s=0, max_wait_s=0, busy=False, due=False, pieces=1) == (
        Dispatch([])
    )


def test_one_forward_at_a_time_on_the_backends_threads() -> None:
    slots = OneForward()
    assert slots.ready_worker() == 0
    assert slots.grant(0, behind=3) == Grant(threads=None, share=1.0)
    assert slots.ready_worker() is None
    assert slots.pieces() == 1
    slots.release(0)
    assert slots.ready_worker() == 0


def test_core_share_as_forward_slots() -> None:
    cores = CoreShare(threads=2, workers=2)
    assert cores.ready_worker() == 0  # the primary starts what comes first
    assert cores.pieces() == 2  # as many workers as threads: one piece per free thread
    assert cores.grant(0, behind=1) == Grant(threads=1, share=0.5)
    assert cores.ready_worker() == 1  # a thread is free for the side worker
    assert cores.grant(1, behind=0) == Grant(threads=1, share=0.5)
    assert cores.ready_worker() is None
    cores.release(1)
    cores.release(0)
    assert cores.free == 2
    assert CoreShare(threads=4, workers=2).pieces() == 1  # fewer workers: a lone batch, wide
