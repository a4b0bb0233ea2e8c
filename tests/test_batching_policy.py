"""The batching policy's pure parts: when a batch is full, and what goes now."""

from __future__ import annotations

import pytest

from service.batching import BatchLimits, Dispatch, is_full, next_batch
from service.cores import CoreShare, Grant, OneForward

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
