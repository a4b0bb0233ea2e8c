"""Dynamic cross-request batching: an asyncio front, a scheduler and the model threads.

Requests are admitted (or refused with 429) as a whole (`admission`), then their items
wait in one queue. The scheduler, on the event loop, keeps the next batch staged while the
model runs the current one (`batching.form_batch` picks it), and re-forms the staged batch
when new items could improve it, until a model thread takes it. Usually one model thread
runs the forwards; on a CPU several may, sharing the torch threads (`cores.CoreShare`),
and work that fits one batch is split into one piece per free thread.
Items whose request was cancelled (client gone, deadline passed) are dropped before compute.
A failing forward pass fails the requests in that batch only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from service.admission import Admission, Job, QueueLimits, new_job
from service.backends.base import Backend
from service.batching import BatchLimits, form_batch
from service.cores import CoreShare
from service.errors import ErrorType, ServiceError
from service.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Work:
    """One item of a job waiting for, or in, a forward pass."""

    job: Job
    index: int
    ids: Sequence[int]
    seq: int
    admitted: float = field(default_factory=time.monotonic)


class Batcher:
    """Owns the queue, the scheduler task and the model threads (one, or on a CPU a primary
    and the side workers of a `CoreShare`)."""

    def __init__(
        self,
        backend: Backend,
        limits: BatchLimits,
        queue: QueueLimits,
        metrics: Metrics,
        cores: CoreShare | None = None,
    ) -> None:
        """`cores`: run up to `cores.workers` forwards at once, sharing its threads (CPU);
        None: one forward at a time, on the backend's own threads."""
        self.backend = backend
        self.limits = limits
        self.queue = queue
        self.metrics = metrics
        self.admission = Admission(queue, metrics)
        self._pending: list[Work] = []
        self._staged: list[Work] | None = None
        self._cores = cores
        self._workers = 1 if cores is None else cores.workers
        self._running = 0  # forwards in flight
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # guards the state; the primary waits on it
        self._side = threading.Condition(lock)  # model threads beside the primary wait on it
        self._wake = asyncio.Event()
        self._seq = 0
        self._due = -1  # items up to this seq were due as one batch when it was split
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[Future[None]] = []
        self._side_pool: ThreadPoolExecutor | None = None
        self._scheduler: asyncio.Task[None] | None = None

    # The asyncio front -------------------------------------------------------------------

    async def start(self, model_thread: ThreadPoolExecutor) -> None:
        """Start the scheduler task, and the forward loop on `model_thread`.

        `model_thread` has one worker: the thread that loaded and warmed up the model, whose
        OpenMP team (torch on CPU keeps one per calling thread) is the one wide team: with a
        `CoreShare`, the forwards beside it run on threads of their own, one core each.
        """
        self._loop = asyncio.get_running_loop()
        self._threads = [model_thread.submit(self._run_model, 0)]
        if self._workers > 1:
            self._side_pool = ThreadPoolExecutor(
                self._workers - 1, thread_name_prefix="warm-model-side"
            )
            side = range(1, self._workers)
            self._threads += [self._side_pool.submit(self._run_model, w) for w in side]
        self._scheduler = asyncio.create_task(self._schedule(), name="warm-scheduler")

    def submit(self, sequences: Sequence[Sequence[int]], deadline: float) -> Job:
        """Admit one request's token sequences, or raise 429 (overloaded) / 422 (too big)."""
        assert self._loop is not None, "Batcher.start() first"
        job = new_job(self._loop, sequences, deadline, self.backend.info.num_labels)
        self.admission.admit(job.tokens)
        for index, ids in enumerate(sequences):
            self._pending.append(Work(job, index, ids, self._seq))
            self._seq += 1
        if self._staged is None and self._taker() is not None:
            self._restage_guarded()  # an idle model gets its batch now, not a loop turn later
        else:
            self._wake.set()
        self._publish()
        return job

    def cancel(self, job: Job, reason: str) -> None:
        """Give up on a job (client gone, deadline passed): its waiting items are dropped."""
        if job.done:
            return
        job.drop_reason = reason
        self._finish_job(job)
        if not job.future.done():
            job.future.cancel()

    async def stop(self, timeout: float) -> None:
        """Wait up to `timeout` for admitted work, fail what is left, stop the model threads."""
        self.admission.closing = True
        end = time.monotonic() + timeout
        while self.admission.requests and time.monotonic() < end:
            await asyncio.sleep(0.01)
        self._fail_waiting(ServiceError(ErrorType.NOT_READY, "the service is shutting down"))
        with self._cond:
            self._cond.notify_all()
            self._side.notify_all()
        if self._scheduler is not None:
            self._scheduler.cancel()
        if self._threads:
            await asyncio.wait([asyncio.wrap_future(t) for t in self._threads], timeout=timeout)
        if self._side_pool is not None:
            self._side_pool.shutdown(wait=False, cancel_futures=True)
        self._publish()

    # The scheduler (event loop) ----------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._restage_guarded()
            self._publish()

    def _restage_guarded(self) -> None:
        try:
            self._restage()
        except Exception:  # the scheduler's boundary: a bug must not stall every request
            log.exception("batch scheduling failed; failing the waiting requests")
            self._fail_waiting(ServiceError(ErrorType.INTERNAL, "batch scheduling failed"))

    def _fail_waiting(self, error: ServiceError) -> None:
        with self._cond:
            waiting = self._pending + (self._staged or [])
            self._pending, self._staged = [], None
        for job in {w.job for w in waiting}:
            self._fail(job, error)
        self._drop(waiting)

    def _restage(self) -> None:
        with self._cond:
            staged, self._staged = self._staged, None
            if staged is not None and self._full(staged):
                self._staged = staged  # nothing new can improve a full batch
                return
            busy = self._taker() is None  # no model thread could start a batch now
            pieces = self._pieces()
        if staged:
            self._pending = sorted(staged + self._pending, key=lambda w: w.seq)
        self._drop_stale()
        if not self._pending:
            return
        lengths = [len(w.ids) for w in self._pending]
        chosen = form_batch(lengths, self.limits)
        batch = [self._pending[i] for i in chosen]
        oldest_wait = time.monotonic() - self._pending[0].admitted
        due = self._pending[0].seq <= self._due  # the rest of a batch already split: go
        if not (busy or due or self._full(batch)) and oldest_wait < self.queue.max_wait_s:
            assert self._loop is not None
            self._loop.call_later(self.queue.max_wait_s - oldest_wait, self._wake.set)
            return
        if pieces > 1 and len(chosen) == len(lengths) and len(chosen) > 1:
            # All the work there is fits one batch: one piece per free thread. The smallest
            # goes first, so that the primary counts the rest as queued behind it.
            piece = replace(self.limits, max_batch_size=max(1, len(chosen) // pieces))
            chosen = form_batch(lengths, piece)
            batch = [self._pending[i] for i in chosen]
            self._due = max(w.seq for w in self._pending)
        taken = set(chosen)
        self._pending = [w for i, w in enumerate(self._pending) if i not in taken]
        with self._cond:
            self._staged = batch
            taker = self._taker()
            if taker is not None:
                taker.notify()

    def _pieces(self) -> int:
        """Into how many forwards side by side the work goes when it all fits one batch.

        With as many model workers as threads, one per free thread: pieces on one thread
        each finish sooner together than one batch over those threads (`service.cores`).
        Else 1: a lone batch takes the free threads.
        """
        cores = self._cores
        if cores is None or cores.threads != cores.workers:
            return 1
        return max(1, cores.free)

    def _taker(self) -> threading.Condition | None:
        """Where the model thread that can start a batch now waits (None: all are busy)."""
        if self._cores is None:
            return self._cond if not self._running else None
        if not self._cores.running[0]:
            return self._cond  # the primary starts every batch it can
        return self._side if self._cores.free and self._running < self._workers else None

    def _full(self, batch: list[Work]) -> bool:
        longest = max(len(w.ids) for w in batch)
        return (
            len(batch) >= self.limits.max_batch_size
            or longest * (len(batch) + 1) > self.limits.max_batch_tokens
        )

    def _drop_stale(self) -> None:
        now = time.monotonic()
        for work in self._pending:
            if not work.job.done and now > work.job.deadline:
                self._fail(
                    work.job,
                    ServiceError(ErrorType.DEADLINE_EXCEEDED, "deadline passed while queued"),
                    reason="deadline",
                )
        stale = [w for w in self._pending if w.job.done]
        if stale:
            self._pending = [w for w in self._pending if not w.job.done]
            self._drop(stale)

    def _drop(self, works: list[Work]) -> None:
        for work in works:
            self.admission.release(len(work.ids))
            self.metrics.dropped.labels(work.job.drop_reason).inc()

    # The model threads -------------------------------------------------------------------

    def _run_model(self, worker: int) -> None:
        assert self._loop is not None
        self.metrics.thread_cpu.register("model")
        while (taken := self._take(worker)) is not None:
            batch, threads = taken
            if self._pending:  # stage the next batch meanwhile (new arrivals wake it anyway)
                self._loop.call_soon_threadsafe(self._wake.set)
            live = [w for w in batch if not w.job.done]
            outputs: np.ndarray | None = None
            error: Exception | None = None
            started = time.monotonic()
            if live:
                try:
                    outputs = self.backend.forward([w.ids for w in live], threads)
                    expected = (len(live), self.backend.info.num_labels)
                    if outputs.shape != expected:
                        raise RuntimeError(f"outputs of shape {outputs.shape}, not {expected}")
                except Exception as exc:  # the worker's boundary: fail this batch, keep serving
                    log.exception("forward pass failed on a batch of %d items", len(live))
                    error = exc
            elapsed = time.monotonic() - started
            with self._cond:
                self._running -= 1
                if self._cores is not None:
                    self._cores.give(worker)
                    if worker:  # its thread may let another side thread start
                        self._side.notify()
            self._loop.call_soon_threadsafe(
                self._complete, batch, live, outputs, error, started, elapsed, threads
            )

    def _take(self, worker: int) -> tuple[list[Work], int | None] | None:
        """Wait for the staged batch and the threads to run it on; None: stop this thread."""
        assert self._loop is not None
        with self._cond:
            while True:
                if self._staged is not None:
                    threads = None
                    if self._cores is not None:
                        # Batches as large as this one waiting behind it (read without the
                        # event loop's lock: a hint). A side worker gets a thread only if
                        # one waits for it: an idle core costs more than a wide team.
                        behind = len(self._pending) // len(self._staged)
                        threads = self._cores.take(worker, behind)
                    if self._cores is None or threads is not None:
                        batch, self._staged = self._staged, None
                        self._running += 1
                        return batch, threads
                elif self.admission.closing:
                    return None
                # Wake now and then: if shutdown never ran (a forced exit), the closed loop
                # ends this thread instead of blocking interpreter exit.
                waiting = self._side if worker else self._cond
                if not waiting.wait(timeout=1.0) and self._loop.is_closed():
                    return None

    # Back on the event loop --------------------------------------------------------------

    def _complete(
        self,
        batch: list[Work],
        live: list[Work],
        outputs: np.ndarray | None,
        error: Exception | None,
        started: float,
        elapsed: float,
        threads: int | None,
    ) -> None:
        kept = {id(w) for w in live}
        self._drop([w for w in batch if id(w) not in kept])
        if not live:
            return
        real = sum(len(w.ids) for w in live)
        if error is not None or outputs is None:
            self.admission.release(real)
            failure = ServiceError(
                ErrorType.BACKEND_ERROR,
                f"the model failed on a batch with this request: {type(error).__name__}: {error}",
            )
            for job in {w.job for w in live}:
                self._fail(job, failure)
            return
        # The queue's throughput estimate counts this batch's share of the machine's threads.
        share = 1.0 if self._cores is None or threads is None else threads / self._cores.threads
        self.admission.scored(real, elapsed * share)
        padded = max(len(w.ids) for w in live) * len(live)
        m = self.metrics
        m.inference_latency.observe(elapsed)
        m.forwards.labels("all" if threads is None else str(threads)).inc()
        m.batch_size.observe(len(live))
        m.batch_tokens.observe(padded)
        m.padding_ratio.observe(1 - real / padded)
        m.items.inc(len(live))
        m.tokens.inc(real)
        for work, row in zip(live, outputs, strict=True):
            m.queue_wait.observe(started - work.admitted)
            job = work.job
            if job.done:
                continue
            job.outputs[work.index] = row
            job.remaining -= 1
            if job.remaining == 0:
                self._finish_job(job)
                if not job.future.done():
                    job.future.set_result(job.outputs)
        self._publish()

    def _fail(self, job: Job, error: ServiceError, reason: str = "failed") -> None:
        if job.done:
            return
        job.drop_reason = reason
        self._finish_job(job)
        if not job.future.done():
            job.future.set_exception(error)

    def _finish_job(self, job: Job) -> None:
        job.done = True
        self.admission.answered()

    def _publish(self) -> None:
        self.admission.publish(len(self._pending) + len(self._staged or []))
