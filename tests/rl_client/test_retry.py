"""The client's pure policy: retry delays, Retry-After parsing, chunk planning."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from rl_client.retry import REQUEST_OVERHEAD_BYTES, parse_retry_after, plan_chunks, retry_delay


@pytest.mark.parametrize(
    ("retry", "retry_after", "jitter", "expected"),
    [
        (0, None, 0.0, 0.25),  # 0.5 * 2**0 * (0.5 + 0)
        (0, None, 0.5, 0.375),  # 0.5 * 0.75
        (3, None, 0.5, 3.0),  # 0.5 * 8 * 0.75
        (10, None, 0.0, 15.0),  # capped at 30, times 0.5
        (0, 2.0, 0.5, 2.1),  # Retry-After 2 is a floor, spread by 5 %
        (3, 0.1, 0.0, 2.0),  # the backoff (4 * 0.5) exceeds a short Retry-After
    ],
)
def test_retry_delay(retry: int, retry_after: float | None, jitter: float, expected: float) -> None:
    delay = retry_delay(retry, base_s=0.5, max_s=30.0, retry_after_s=retry_after, jitter=jitter)
    assert delay == pytest.approx(expected)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("3", 3.0),
        (" 1.5 ", 1.5),
        ("-4", 0.0),
        ("soon", None),
        ("nan", None),
        (None, None),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # a date in the past: retry now
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=timezone.utc)
    assert parse_retry_after(header, now=now) == expected


def test_chunks_by_count() -> None:
    assert plan_chunks([10] * 5, max_items=2, max_bytes=10_000) == [
        range(0, 2),
        range(2, 4),
        range(4, 5),
    ]


def test_chunks_by_bytes() -> None:
    # Three items of 100 bytes (+1 separator each) fill the limit exactly; a fourth does not fit.
    limit = REQUEST_OVERHEAD_BYTES + 3 * 101
    assert plan_chunks([100] * 5, max_items=10, max_bytes=limit) == [range(0, 3), range(3, 5)]
    assert plan_chunks([100] * 3, max_items=10, max_bytes=limit) == [range(0, 3)]


def test_an_oversized_item_gets_its_own_chunk() -> None:
    assert plan_chunks([10, 1000, 10], max_items=10, max_bytes=500) == [
        range(0, 1),
        range(1, 2),
        range(2, 3),
    ]


def test_chunk_edge_cases() -> None:
    assert plan_chunks([], max_items=4, max_bytes=1000) == []
    with pytest.raises(ValueError, match="max_items must be at least 1"):
        plan_chunks([1], max_items=0, max_bytes=1000)
