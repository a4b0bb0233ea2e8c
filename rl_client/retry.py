"""Pure client policy: which failures to retry, how long to wait, how to split a batch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

# Overloaded, and the transient failures of a gateway or a pod that is starting or draining.
# Everything else (a 4xx, a 500 from the model) fails the same way when sent again.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# The JSON around the items of a /v1/score body, with room to spare.
REQUEST_OVERHEAD_BYTES = 256


def retry_delay(
    retry: int, *, base_s: float, max_s: float, retry_after_s: float | None, jitter: float
) -> float:
    """Seconds to wait before retry number `retry` (0-based).

    Exponential backoff `base_s * 2**retry` capped at `max_s`, scaled by a jitter in
    [0.5, 1) (`jitter` is a uniform draw in [0, 1)) so that clients rejected together do not
    return together. A server's Retry-After is a floor, spread by up to 10 % on top.
    """
    backoff = min(max_s, base_s * 2.0**retry) * (0.5 + 0.5 * jitter)
    if retry_after_s is None:
        return backoff
    return max(backoff, retry_after_s * (1.0 + 0.1 * jitter))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def plan_chunks(sizes: Sequence[int], *, max_items: int, max_bytes: int) -> list[range]:
    """Split items (their encoded sizes in bytes) into consecutive requests within both limits.

    Greedy in order: a request closes when one more item would exceed `max_items` or
    `max_bytes` (counting REQUEST_OVERHEAD_BYTES and a separator per item). An item too
    large on its own still gets a request of its own; the caller rejects it first.
    """
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items}")
    chunks: list[range] = []
    start = 0
    used = REQUEST_OVERHEAD_BYTES
    for i, size in enumerate(sizes):
        count = i - start
        if count and (count == max_items or used + size + 1 > max_bytes):
            chunks.append(range(start, i))
            start, used = i, REQUEST_OVERHEAD_BYTES
        used += size + 1
    if start < len(sizes):
        chunks.append(range(start, len(sizes)))
    return chunks
