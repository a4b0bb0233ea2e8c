"""Dynamic cross-request batching: an asyncio front, a scheduler and the model threads.

Requests are admitted (or refused with 429) as a whole (`admission`), then their items
wait in one queue. The scheduler, on the event loop, keeps the next batch staged while the
model runs the current one, and re-forms the staged batch when new items could improve it,
until a model thread takes it. The policy (what goes, and when) is `batching.next_batch`;
who runs it, and on how many threads, is `cores.ForwardSlots` (one forward at a time, or on
a CPU several side by side, sharing the torch threads).
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
from service.backends.base import Backend, OutOfMemory
from service.batching import BatchLimits, is_full, next_batch
from service.cores import CoreShare, ForwardSlots, Grant, OneForward
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
    """Owns the queue, the scheduler task and the model threads (a primary, and the side
    workers its `ForwardSlots` has)."""

    def __init__(
        self,
        backend: Backend,
        limits: BatchLimits,
        queue: QueueLimits,
        metrics: Metrics,
        cores: CoreShare | None = None,
    ) -> None:
        """`cores`: run up to `cores.workers` forwards at once, sharing its threads (CPU);
        None: one forward at a time, on the backend's own threads (`OneForward`)."""
        self.backend = backend
        self.limits = limits
        self.queue = queue
        self.metrics = metrics
        self.admission = Admission(queue, metrics)
        self._pending: list[Work] = []
        self._staged: list[Work] | None = None
        self._slots: ForwardSlots = cores if cores is not None else OneForward()
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # guards the state; the primary waits on it
        self._side = threading.Condition(lock)  # model threads beside the primary wait on it
        self._wake = asyncio.Event()
        self._seq = 0
        self._split_until = -1  # items up to this seq were split from one batch: they go now
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
        workers = self._slots.workers
        if workers > 1:
            self._side_pool = ThreadPoolExecutor(workers - 1, thread_name_prefix="warm-model-side")
            side = range(1, workers)
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
        if self._staged is None and self._slots.ready_worker() is not None:
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
            if staged is not None and is_full([len(w.ids) for w in staged], self.limits):
                self._staged = staged  # nothing new can improve a full batch
                return
            busy = self._slots.ready_worker() is None  # no model thread could start one now
            pieces = self._slots.pieces()
        if staged:
            self._pending = sorted(staged + self._pending, key=lambda w: w.seq)
        self._drop_stale()
        if not self._pending:
            return
        decision = next_batch(
            [len(w.ids) for w in self._pending],
            self.limits,
            waited_s=time.monotonic() - self._pending[0].admitted,
            max_wait_s=self.queue.max_wait_s,
            busy=busy,
            due=self._pending[0].seq <= self._split_until,
            pieces=pieces,
        )
        if not decision.batch:
            assert self._loop is not None
            self._loop.call_later(decision.wait_s, self._wake.set)
            return
        if decision.split:
            self._split_until = max(w.seq for w in self._pending)
        batch = [self._pending[i] for i in decision.batch]
        taken = set(decision.batch)
        self._pending = [w for i, w in enumerate(self._pending) if i not in taken]
        with self._cond:
            self._staged = batch
            self._wake_worker()

    def _wake_worker(self) -> None:
        """Wake the model thread that can start the staged batch now, if any (lock held)."""
        worker = self._slots.ready_worker()
        if worker is not None:
            (self._side if worker else self._cond).notify()

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
            batch, grant = taken
            if self._pending:  # stage the next batch meanwhile (new arrivals wake it anyway)
                self._loop.call_soon_threadsafe(self._wake.set)
            live = [w for w in batch if not w.job.done]
            outputs: np.ndarray | None = None
            error: Exception | None = None
            started = time.monotonic()
            if live:
                try:
                    outputs = self._forward_fitting([w.ids for w in live], grant.threads)
                    expected = (len(live), self.backend.info.num_labels)
                    if outputs.shape != expected:
                        raise RuntimeError(f"outputs of shape {outputs.shape}, not {expected}")
                except Exception as exc:  # the worker's boundary: fail this batch, keep serving
                    log.exception("forward pass failed on a batch of %d items", len(live))
                    error = exc
            elapsed = time.monotonic() - started
            with self._cond:
                self._slots.release(worker)
                if worker:  # its thread may let another side thread start
                    self._side.notify()
            self._loop.call_soon_threadsafe(
                self._complete, batch, live, outputs, error, started, elapsed, grant
            )

    def _forward_fitting(self, ids: list[Sequence[int]], threads: int | None) -> np.ndarray:
        """The batch's outputs; a batch out of device memory is halved and each half run
        again (down to single items), after the device's cache is emptied and the token
        budget lowered below what failed, so the scheduler forms batches that fit."""
        try:
            return self.backend.forward(ids, threads)
        except OutOfMemory:
            self.metrics.out_of_memory.inc()
            if len(ids) == 1:
                raise
            self.backend.free_memory()
            self._lower_budget(max(len(s) for s in ids) * len(ids))
            half = len(ids) // 2
            return np.concatenate(
                [
                    self._forward_fitting(ids[:half], threads),
                    self._forward_fitting(ids[half:], threads),
                ]
            )

    def _lower_budget(self, failed_tokens: int) -> None:
        """Halve the padded-token budget below a batch that ran out of memory (never below
        one longest item); the scheduler reads `limits` whole, so one assignment does."""
        budget = max(self.backend.info.max_length, failed_tokens // 2)
        if budget < self.limits.max_batch_tokens:
            log.warning(
                "out of device memory on %d padded tokens: batch budget lowered from %d to %d",
                failed_tokens,
                self.limits.max_batch_tokens,
                budget,
            )
            self.limits = replace(self.limits, max_batch_tokens=budget)

    def _take(self, worker: int) -> tuple[list[Work], Grant] | None:
        """Wait for the staged batch and the right to run it; None: stop this thread."""
        assert self._loop is not None
        with self._cond:
            while True:
                if self._staged is not None:
                    # Batches as large as this one waiting behind it (read without the event
                    # loop's lock: a hint). A side worker gets a thread only if one waits for
                    # it: an idle core costs more than a wide team.
                    behind = len(self._pending) // len(self._staged)
                    grant = self._slots.grant(worker, behind)
                    if grant is not None:
                        batch, self._staged = self._staged, None
                        return batch, grant
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
        grant: Grant,
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
        self.admission.scored(real, elapsed * grant.share)
        padded = max(len(w.ids) for w in live) * len(live)
        m = self.metrics
        m.inference_latency.observe(elapsed)
        m.forwards.labels("all" if grant.threads is None else str(grant.threads)).inc()
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
