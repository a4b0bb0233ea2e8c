"""Scheduling for a backend that batches continuously itself (vLLM's engine).

vLLM's scheduler adds new sequences to the running batch at every engine step, packs them
without padding and shares cached prefixes; forming our own batches in front of it would
only delay work. So a request, once admitted under the same bounds as with the batcher
(`admission`: 429 when full, 422 when too big, 503 when closing), goes straight into the
engine, one engine request per item. A request given up on (client gone, deadline passed)
is withdrawn from the engine; an engine failure fails that request only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from service.admission import Admission, Job, QueueLimits, new_job
from service.backends.base import ContinuousBackend
from service.errors import ErrorType, ServiceError
from service.metrics import Metrics

log = logging.getLogger(__name__)


class ContinuousScheduler:
    """Admits requests and hands their items to the backend at once."""

    def __init__(self, backend: ContinuousBackend, queue: QueueLimits, metrics: Metrics) -> None:
        self.backend = backend
        self.metrics = metrics
        self.admission = Admission(queue, metrics)
        self._running: dict[Job, Future[np.ndarray]] = {}
        self._items = 0  # items in the engine, not yet answered
        # The engine runs requests side by side: its throughput (for Retry-After) is tokens
        # scored per second of wall time while it has work, measured over busy stretches.
        self._busy_since: float | None = None
        self._done_tokens = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, model_thread: ThreadPoolExecutor) -> None:
        """Remember the serving loop; the backend's engine runs on its own thread."""
        self._loop = asyncio.get_running_loop()

    def submit(self, sequences: Sequence[Sequence[int]], deadline: float) -> Job:
        """Admit one request's token sequences and start scoring them, or raise."""
        loop = self._loop
        assert loop is not None, "ContinuousScheduler.start() first"
        job = new_job(loop, sequences, deadline, self.backend.info.num_labels)
        self.admission.admit(job.tokens)
        started = time.monotonic()
        try:
            future = self.backend.submit(sequences)
        except Exception as error:  # the engine is gone: nothing was queued
            self.admission.answered()
            self.admission.release(job.tokens)
            raise ServiceError(
                ErrorType.BACKEND_ERROR, f"the model cannot take work: {error}"
            ) from error
        self._running[job] = future
        if self._busy_since is None:
            self._busy_since = started
        self._items += job.remaining

        def completed(done: Future[np.ndarray]) -> None:  # on the engine's thread
            with contextlib.suppress(RuntimeError):  # the serving loop is already closed
                loop.call_soon_threadsafe(self._complete, job, done, started)

        future.add_done_callback(completed)
        self.admission.publish(self._items)
        return job

    def cancel(self, job: Job, reason: str) -> None:
        """Give up on a job: its items still in the engine are aborted there."""
        if job.done:
            return
        job.drop_reason = reason
        self.metrics.dropped.labels(reason).inc(job.remaining)
        self._end(job)
        self.admission.release(job.tokens)
        if not job.future.done():
            job.future.cancel()
        self.admission.publish(self._items)

    async def stop(self, timeout: float) -> None:
        """Wait up to `timeout` for admitted work, then fail and withdraw what is left."""
        self.admission.closing = True
        end = time.monotonic() + timeout
        while self.admission.requests and time.monotonic() < end:
            await asyncio.sleep(0.01)
        for job in list(self._running):
            self.metrics.dropped.labels("failed").inc(job.remaining)
            self._fail(job, ServiceError(ErrorType.NOT_READY, "the service is shutting down"))
        self.admission.publish(self._items)

    # Back on the event loop --------------------------------------------------------------

    def _complete(self, job: Job, future: Future[np.ndarray], started: float) -> None:
        if job.done:  # cancelled or failed meanwhile: already accounted for
            return
        elapsed = time.monotonic() - started
        if future.cancelled():
            failure = "the engine dropped this request"
        elif (error := future.exception()) is not None:
            failure = f"the model failed on this request: {type(error).__name__}: {error}"
        else:
            failure = None
        if failure is not None:
            log.error("%s (%d items)", failure, job.remaining)
            self._fail(job, ServiceError(ErrorType.BACKEND_ERROR, failure))
            return
        outputs = future.result()
        expected = job.outputs.shape
        if outputs.shape != expected:
            self._fail(
                job,
                ServiceError(
                    ErrorType.BACKEND_ERROR, f"outputs of shape {outputs.shape}, not {expected}"
                ),
            )
            return
        items = job.remaining
        self._done_tokens += job.tokens
        self._end(job)
        self.admission.release(job.tokens)
        m = self.metrics
        m.inference_latency.observe(elapsed)
        m.items.inc(items)
        m.tokens.inc(job.tokens)
        job.outputs[:] = outputs
        if not job.future.done():
            job.future.set_result(job.outputs)
        self.admission.publish(self._items)

    def _fail(self, job: Job, error: ServiceError) -> None:
        if job.done:
            return
        job.drop_reason = "failed"
        self._end(job)
        self.admission.release(job.tokens)
        if not job.future.done():
            job.future.set_exception(error)
        self.admission.publish(self._items)

    def _end(self, job: Job) -> None:
        """The job leaves the system: withdraw its items from the engine if still there."""
        job.done = True
        self.admission.answered()
        self._items -= job.remaining
        job.remaining = 0
        now = time.monotonic()
        if self._busy_since is not None and (not self._items or now - self._busy_since >= 1):
            self.admission.observe(self._done_tokens, now - self._busy_since)
            self._done_tokens = 0
            self._busy_since = now if self._items else None
        future = self._running.pop(job, None)
        if future is not None:
            future.cancel()
