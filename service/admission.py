"""What every scheduler shares: admitted jobs, the queue bounds, and the scheduler interface.

A request is admitted (or refused with 429) as a whole, and counts against the bounds until
it is answered. Two schedulers sit behind one interface: `batcher.Batcher` forms padded
batches for a backend that runs one batch at a time (transformers), `continuous.
ContinuousScheduler` hands items straight to a backend that batches continuously itself
(vLLM's engine).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.errors import ErrorType, ServiceError
from service.metrics import Metrics


@dataclass(eq=False)
class Job:
    """One admitted request: its items' outputs fill `outputs` row by row."""

    outputs: np.ndarray  # (n_items, num_labels)
    remaining: int
    tokens: int
    deadline: float  # time.monotonic()
    future: asyncio.Future[np.ndarray]
    done: bool = False
    drop_reason: str = "cancelled"


@dataclass(frozen=True)
class QueueLimits:
    """Admission bounds: requests and tokens in the system (admitted, not yet answered)."""

    max_requests: int
    max_tokens: int
    max_wait_s: float = 0.0


class Admission:
    """Counts what is admitted and not yet answered, and refuses what would not fit."""

    def __init__(self, limits: QueueLimits, metrics: Metrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self.requests = 0
        self.tokens = 0
        self.closing = False
        self._tokens_per_s = 0.0

    def admit(self, tokens: int) -> None:
        """Count one request of `tokens` tokens in, or raise 503 / 422 (too big) / 429."""
        if self.closing:
            raise ServiceError(ErrorType.NOT_READY, "the service is shutting down", retry_after=1)
        if tokens > self.limits.max_tokens:
            raise ServiceError(
                ErrorType.INVALID_REQUEST,
                f"the request has {tokens} tokens, more than the queue holds "
                f"({self.limits.max_tokens}): split it",
            )
        if (
            self.requests + 1 > self.limits.max_requests
            or self.tokens + tokens > self.limits.max_tokens
        ):
            raise ServiceError(
                ErrorType.OVERLOADED,
                f"queue full ({self.requests} requests, {self.tokens} tokens waiting): retry later",
                retry_after=self.retry_after(),
            )
        self.requests += 1
        self.tokens += tokens

    def answered(self) -> None:
        """One request is answered (scored, failed or given up on)."""
        self.requests -= 1

    def release(self, tokens: int) -> None:
        """`tokens` left the system without being scored (dropped)."""
        self.tokens -= tokens

    def scored(self, tokens: int, seconds: float) -> None:
        """`tokens` were scored in `seconds` of model time: they leave; the rate updates."""
        self.release(tokens)
        self.observe(tokens, seconds)

    def observe(self, tokens: int, seconds: float) -> None:
        """The model scored `tokens` in `seconds`: update the smoothed throughput."""
        if seconds > 0 and tokens > 0:
            rate = tokens / seconds
            self._tokens_per_s = (
                rate if not self._tokens_per_s else 0.8 * self._tokens_per_s + 0.2 * rate
            )

    def retry_after(self) -> float:
        """Seconds until the queued tokens are scored at the recent throughput."""
        if self._tokens_per_s <= 0:
            return 1.0
        return max(1.0, self.tokens / self._tokens_per_s)

    def publish(self, waiting_items: int) -> None:
        """The queue gauges."""
        self.metrics.queue_requests.set(self.requests)
        self.metrics.queue_depth.set(waiting_items)
        self.metrics.queue_tokens.set(self.tokens)


def new_job(
    loop: asyncio.AbstractEventLoop,
    sequences: Sequence[Sequence[int]],
    deadline: float,
    num_labels: int,
) -> Job:
    """An admitted job awaiting the outputs of `sequences`."""
    return Job(
        outputs=np.zeros((len(sequences), num_labels)),
        remaining=len(sequences),
        tokens=sum(len(s) for s in sequences),
        deadline=deadline,
        future=loop.create_future(),
    )


class Scheduler(Protocol):
    """Admits requests, gets their items scored, answers each request's future."""

    async def start(self, model_thread: ThreadPoolExecutor) -> None:
        """Start scheduling (on the serving event loop)."""

    def submit(self, sequences: Sequence[Sequence[int]], deadline: float) -> Job:
        """Admit one request's token sequences, or raise 429 / 422 / 503."""

    def cancel(self, job: Job, reason: str) -> None:
        """Give up on a job (client gone, deadline passed): its items are dropped."""

    async def stop(self, timeout: float) -> None:
        """Wait up to `timeout` for admitted work, fail what is left, stop."""
