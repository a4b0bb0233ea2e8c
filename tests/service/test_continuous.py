"""The continuous scheduler (vLLM's engine in production) over a real, gated model backend.

`GatedBackend` wraps the tiny GPT-2 reward model in the `ContinuousBackend` interface: each
`submit` gets its own worker thread, which waits at a gate before scoring, so a test can hold
work "in the engine" while it checks admission, cancellation and shutdown.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from tiny_models import PAD_ID

from service.admission import Admission, QueueLimits
from service.backends.base import ModelInfo
from service.backends.transformers import TransformersBackend
from service.continuous import ContinuousScheduler
from service.errors import ErrorType, ServiceError
from service.metrics import Metrics

TIMEOUT = 30.0  # seconds any awaited result may take before the test fails instead of hanging


class GatedBackend:
    """A `ContinuousBackend` over a real model: items wait at `gate` (open by default)."""

    def __init__(self, inner: TransformersBackend) -> None:
        self.inner = inner
        self.info: ModelInfo = inner.info
        self.gate = threading.Event()
        self.gate.set()
        self.futures: list[Future[np.ndarray]] = []  # every future handed out, in order
        self.scored: list[list[list[int]]] = []  # the sequences the model actually ran
        self.fail_next: Exception | None = None  # the next submitted request fails with it
        self.refuse_next: Exception | None = None  # the next `submit` raises it (engine gone)
        self.mangle_next: Callable[[np.ndarray], np.ndarray] | None = None
        self._threads: list[threading.Thread] = []

    def forward(self, sequences: Sequence[Sequence[int]], threads: int | None = None) -> np.ndarray:
        return self.inner.forward(sequences, threads)

    def submit(self, sequences: Sequence[Sequence[int]]) -> Future[np.ndarray]:
        refusal, self.refuse_next = self.refuse_next, None
        if refusal is not None:
            raise refusal
        future: Future[np.ndarray] = Future()
        self.futures.append(future)
        failure, self.fail_next = self.fail_next, None
        mangle, self.mangle_next = self.mangle_next, None
        thread = threading.Thread(
            target=self._run,
            args=(future, [list(s) for s in sequences], failure, mangle),
            daemon=True,
        )
        self._threads.append(thread)
        thread.start()
        return future

    def _run(
        self,
        future: Future[np.ndarray],
        sequences: list[list[int]],
        failure: Exception | None,
        mangle: Callable[[np.ndarray], np.ndarray] | None,
    ) -> None:
        self.gate.wait()
        if not future.set_running_or_notify_cancel():  # withdrawn while waiting: never run
            return
        if failure is not None:
            future.set_exception(failure)
            return
        try:
            outputs = self.inner.forward(sequences)
        except Exception as error:
            future.set_exception(error)
            return
        self.scored.append(sequences)
        future.set_result(outputs if mangle is None else mangle(outputs))

    def join(self) -> None:
        """Open the gate and wait for every worker thread to finish."""
        self.gate.set()
        for thread in self._threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "a GatedBackend worker is stuck"

    def close(self) -> None:
        self.join()  # the shared inner model outlives each test


@pytest.fixture(scope="module")
def inner(gpt2_rm: Path) -> TransformersBackend:
    """The tiny GPT-2 reward model (vocabulary of 300, one label), loaded once."""
    return TransformersBackend(
        gpt2_rm,
        device="cpu",
        dtype="float32",
        max_length=128,
        pad_token_id=PAD_ID,
        trust_remote_code=False,
    )


@pytest.fixture
def backend(inner: TransformersBackend) -> Iterator[GatedBackend]:
    gated = GatedBackend(inner)
    yield gated
    gated.close()


async def started(
    backend: GatedBackend, limits: QueueLimits, metrics: Metrics
) -> ContinuousScheduler:
    scheduler = ContinuousScheduler(backend, limits, metrics)
    await scheduler.start(None)  # type: ignore[arg-type]  # it runs no model thread
    return scheduler


def deadline() -> float:
    return time.monotonic() + 60


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def queue(metrics: Metrics) -> tuple[float, float, float]:
    """(requests, items, tokens) admitted and not yet answered, from the gauges."""
    return (
        sample(metrics, "warm_queue_requests"),
        sample(metrics, "warm_queue_depth"),
        sample(metrics, "warm_queue_tokens"),
    )


def scored(metrics: Metrics) -> tuple[float, float]:
    """(items, tokens) scored."""
    return sample(metrics, "warm_items_scored_total"), sample(metrics, "warm_tokens_scored_total")


def inferences(metrics: Metrics) -> float:
    return sample(metrics, "warm_inference_duration_seconds_count")


async def failure_of(future: asyncio.Future[np.ndarray]) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await asyncio.wait_for(future, TIMEOUT)
    return caught.value


# --- scoring --------------------------------------------------------------------------------


def test_a_job_gets_the_models_outputs_and_the_metrics_add_up(
    backend: GatedBackend, inner: TransformersBackend
) -> None:
    metrics = Metrics()
    sequences = [[5, 6, 7], [8, 9]]
    backend.gate.clear()

    async def scenario() -> tuple[np.ndarray, tuple[float, float, float]]:
        scheduler = await started(backend, QueueLimits(8, 100), metrics)
        job = scheduler.submit(sequences, deadline())
        in_flight = queue(metrics)
        backend.gate.set()
        outputs = await asyncio.wait_for(job.future, TIMEOUT)
        scheduler.cancel(job, "deadline")  # too late: a no-op on an answered job
        return outputs, in_flight

    outputs, in_flight = asyncio.run(scenario())
    expected = inner.forward(sequences)
    assert outputs.shape == (2, 1) and outputs.dtype == np.float64
    np.testing.assert_array_equal(outputs, expected)
    assert np.abs(expected).min() > 0  # the zero-filled buffer could not pass for the outputs
    assert backend.scored == [sequences]  # one backend request per job, items in order
    assert in_flight == (1, 2, 5)
    assert queue(metrics) == (0, 0, 0)
    assert scored(metrics) == (2, 5)
    assert inferences(metrics) == 1
    assert sample(metrics, "warm_items_dropped_total", {"reason": "deadline"}) == 0


def test_concurrent_jobs_each_get_their_own_outputs(
    backend: GatedBackend, inner: TransformersBackend
) -> None:
    metrics = Metrics()
    requests = [[[5, 6, 7], [8, 9]], [[10]], [[11, 12, 13, 14], [15, 16], [17, 18, 19]]]
    backend.gate.clear()

    async def scenario() -> tuple[list[np.ndarray], tuple[float, float, float]]:
        scheduler = await started(backend, QueueLimits(8, 100), metrics)
        jobs = [scheduler.submit(sequences, deadline()) for sequences in requests]
        in_flight = queue(metrics)
        backend.gate.set()
        outputs = await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), TIMEOUT)
        return list(outputs), in_flight

    outputs, in_flight = asyncio.run(scenario())
    assert in_flight == (3, 6, 15)  # 3 requests, 2 + 1 + 3 items, 5 + 1 + 9 tokens
    for got, sequences in zip(outputs, requests, strict=True):
        np.testing.assert_array_equal(got, inner.forward(sequences))
    assert len(backend.futures) == 3  # straight to the backend: no batching in front of it
    assert queue(metrics) == (0, 0, 0)
    assert scored(metrics) == (6, 15)
    assert inferences(metrics) == 3


# --- admission ------------------------------------------------------------------------------


def test_a_full_queue_refuses_with_overloaded_then_admits_once_answered(
    backend: GatedBackend,
) -> None:
    metrics = Metrics()
    backend.gate.clear()

    async def scenario() -> None:
        scheduler = await started(backend, QueueLimits(max_requests=1, max_tokens=100), metrics)
        first = scheduler.submit([[5, 6, 7]], deadline())
        with pytest.raises(ServiceError) as refused:
            scheduler.submit([[8, 9]], deadline())
        error = refused.value
        assert error.type is ErrorType.OVERLOADED and error.status == 429
        assert error.retry_after is not None and error.retry_after >= 1
        assert len(backend.futures) == 1  # the refused request never reached the backend
        assert queue(metrics) == (1, 1, 3)  # and is not counted
        backend.gate.set()
        await asyncio.wait_for(first.future, TIMEOUT)
        again = scheduler.submit([[8, 9]], deadline())
        assert (await asyncio.wait_for(again.future, TIMEOUT)).shape == (1, 1)

    asyncio.run(scenario())
    assert queue(metrics) == (0, 0, 0)
    assert scored(metrics) == (2, 5)


def test_the_token_bound_refuses_too_big_and_too_full(backend: GatedBackend) -> None:
    metrics = Metrics()
    backend.gate.clear()

    async def scenario() -> None:
        scheduler = await started(backend, QueueLimits(max_requests=8, max_tokens=10), metrics)
        with pytest.raises(ServiceError) as too_big:
            scheduler.submit([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15]], deadline())  # 11
        assert too_big.value.type is ErrorType.INVALID_REQUEST and too_big.value.status == 422
        assert "split it" in too_big.value.message
        first = scheduler.submit([[5, 6, 7, 8, 9, 10]], deadline())  # 6 tokens
        with pytest.raises(ServiceError) as too_full:
            scheduler.submit([[11, 12], [13, 14, 15]], deadline())  # 5 alone fit, 6 + 5 do not
        assert too_full.value.type is ErrorType.OVERLOADED
        assert too_full.value.retry_after is not None and too_full.value.retry_after >= 1
        exact = scheduler.submit([[16, 17, 18, 19]], deadline())  # 6 + 4 = 10: just fits
        assert len(backend.futures) == 2
        assert queue(metrics) == (2, 2, 10)
        backend.gate.set()
        await asyncio.wait_for(asyncio.gather(first.future, exact.future), TIMEOUT)
        later = scheduler.submit([[11, 12], [13, 14, 15]], deadline())
        assert (await asyncio.wait_for(later.future, TIMEOUT)).shape == (2, 1)

    asyncio.run(scenario())
    assert queue(metrics) == (0, 0, 0)
    assert scored(metrics) == (4, 15)


# --- cancellation ---------------------------------------------------------------------------


def test_a_cancelled_job_is_withdrawn_from_the_backend(backend: GatedBackend) -> None:
    metrics = Metrics()
    backend.gate.clear()

    async def scenario() -> None:
        scheduler = await started(backend, QueueLimits(8, 100), metrics)
        job = scheduler.submit([[5, 6, 7], [8, 9]], deadline())
        assert queue(metrics) == (1, 2, 5)
        scheduler.cancel(job, "disconnected")
        assert backend.futures[0].cancelled()
        assert job.future.cancelled()
        assert queue(metrics) == (0, 0, 0)
        scheduler.cancel(job, "disconnected")  # twice: counted once, nothing goes negative
        assert queue(metrics) == (0, 0, 0)
        assert scheduler.admission.requests == 0 and scheduler.admission.tokens == 0
        backend.join()  # the gate opens: the withdrawn work must stay withdrawn
        await asyncio.sleep(0.05)  # let any stray completion callback run
        assert job.future.cancelled()

    asyncio.run(scenario())
    assert sample(metrics, "warm_items_dropped_total", {"reason": "disconnected"}) == 2
    assert backend.scored == []  # the model never ran the cancelled items
    assert scored(metrics) == (0, 0)
    assert inferences(metrics) == 0
    assert queue(metrics) == (0, 0, 0)


# --- failures -------------------------------------------------------------------------------


def test_a_backend_failure_fails_only_its_job(
    backend: GatedBackend, inner: TransformersBackend
) -> None:
    metrics = Metrics()
    sequences = [[8, 9], [10, 11, 12]]

    async def scenario() -> tuple[ServiceError, np.ndarray]:
        scheduler = await started(backend, QueueLimits(8, 100), metrics)
        backend.fail_next = RuntimeError("CUDA error: device-side assert triggered")
        failed = scheduler.submit([[5, 6, 7]], deadline())
        error = await failure_of(failed.future)
        assert queue(metrics) == (0, 0, 0)
        served = scheduler.submit(sequences, deadline())
        return error, await asyncio.wait_for(served.future, TIMEOUT)

    error, outputs = asyncio.run(scenario())
    assert error.type is ErrorType.BACKEND_ERROR and error.status == 500
    assert "RuntimeError" in error.message and "device-side assert" in error.message
    np.testing.assert_array_equal(outputs, inner.forward(sequences))
    assert scored(metrics) == (2, 5)  # the failed job's item is not counted as scored
    assert inferences(metrics) == 1
    assert queue(metrics) == (0, 0, 0)


def test_outputs_of_the_wrong_shape_fail_the_job(backend: GatedBackend) -> None:
    metrics = Metrics()
    backend.mangle_next = lambda outputs: outputs[:1]  # one row for two items

    async def scenario() -> ServiceError:
        scheduler = await started(backend, QueueLimits(8, 100), metrics)
        job = scheduler.submit([[5, 6, 7], [8, 9]], deadline())
        return await failure_of(job.future)

    error = asyncio.run(scenario())
    assert error.type is ErrorType.BACKEND_ERROR
    assert "shape" in error.message and "(1, 1)" in error.message and "(2, 1)" in error.message
    assert scored(metrics) == (0, 0)
    assert inferences(metrics) == 0
    assert queue(metrics) == (0, 0, 0)


def test_a_backend_refusing_work_fails_the_request_and_frees_its_place(
    backend: GatedBackend,
) -> None:
    metrics = Metrics()

    async def scenario() -> ServiceError:
        scheduler = await started(backend, QueueLimits(max_requests=1, max_tokens=100), metrics)
        backend.refuse_next = RuntimeError("the engine is dead")
        with pytest.raises(ServiceError) as refused:
            scheduler.submit([[5, 6, 7]], deadline())
        assert scheduler.admission.requests == 0 and scheduler.admission.tokens == 0
        job = scheduler.submit([[8, 9]], deadline())  # the one place is free again
        assert (await asyncio.wait_for(job.future, TIMEOUT)).shape == (1, 1)
        return refused.value

    error = asyncio.run(scenario())
    assert error.type is ErrorType.BACKEND_ERROR and "the engine is dead" in error.message
    assert len(backend.futures) == 1
    assert scored(metrics) == (1, 2)
    assert queue(metrics) == (0, 0, 0)


# --- shutdown -------------------------------------------------------------------------------


def test_stop_fails_and_withdraws_what_is_left_then_refuses(backend: GatedBackend) -> None:
    metrics = Metrics()
    backend.gate.clear()

    async def scenario() -> tuple[ServiceError, ServiceError, float]:
        scheduler = await started(backend, QueueLimits(8, 100), metrics)
        job = scheduler.submit([[5, 6, 7], [8, 9]], deadline())
        begun = time.monotonic()
        await scheduler.stop(0.05)
        waited = time.monotonic() - begun
        error = await failure_of(job.future)
        with pytest.raises(ServiceError) as after:
            scheduler.submit([[10]], deadline())
        return error, after.value, waited

    error, after, waited = asyncio.run(scenario())
    assert waited >= 0.05  # it gave the admitted work its grace period first
    assert error.type is ErrorType.NOT_READY and error.status == 503
    assert backend.futures[0].cancelled()
    assert after.type is ErrorType.NOT_READY
    assert len(backend.futures) == 1  # the refused request never reached the backend
    backend.join()
    assert backend.scored == []
    assert scored(metrics) == (0, 0)
    assert queue(metrics) == (0, 0, 0)


def test_stop_waits_for_admitted_work_within_the_timeout(
    backend: GatedBackend, inner: TransformersBackend
) -> None:
    metrics = Metrics()
    sequences = [[5, 6, 7], [8, 9]]
    backend.gate.clear()

    async def scenario() -> tuple[np.ndarray, float]:
        scheduler = await started(backend, QueueLimits(8, 100), metrics)
        job = scheduler.submit(sequences, deadline())
        asyncio.get_running_loop().call_later(0.1, backend.gate.set)
        begun = time.monotonic()
        await scheduler.stop(TIMEOUT)
        waited = time.monotonic() - begun
        assert job.future.done()
        return job.future.result(), waited

    outputs, waited = asyncio.run(scenario())
    np.testing.assert_array_equal(outputs, inner.forward(sequences))
    assert 0.1 <= waited < TIMEOUT / 2  # it returned once the work was answered
    assert not backend.futures[0].cancelled()
    assert scored(metrics) == (2, 5)
    assert queue(metrics) == (0, 0, 0)


def test_retry_after_is_the_queued_tokens_at_the_smoothed_rate() -> None:
    admission = Admission(QueueLimits(max_requests=10, max_tokens=1000), Metrics())
    assert admission.retry_after() == 1.0  # no rate measured yet
    admission.admit(400)
    admission.admit(200)
    admission.scored(100, 1.0)  # first rate: 100 tokens/s; 500 tokens left
    assert admission.retry_after() == pytest.approx(5.0)
    admission.scored(100, 0.5)  # 200 tokens/s, smoothed: 0.8 * 100 + 0.2 * 200 = 120
    assert admission.retry_after() == pytest.approx(400 / 120)
    admission.release(390)  # 10 tokens left: never less than a second
    assert admission.retry_after() == 1.0


def test_the_engines_rate_counts_wall_time_not_each_requests_latency(
    backend: GatedBackend,
) -> None:
    # Eight requests of 5 tokens run side by side for ~0.5 s: about 80 tokens/s, not the
    # 10 tokens/s that dividing each by its own latency would give. The bound leaves room
    # for a loaded machine stretching the wall time up to fourfold.
    async def scenario() -> float:
        limits = QueueLimits(max_requests=10, max_tokens=10_000)
        scheduler = await started(backend, limits, Metrics())
        backend.gate.clear()
        jobs = [scheduler.submit([[5, 6, 7, 8, 9]], deadline()) for _ in range(8)]
        await asyncio.sleep(0.5)
        backend.gate.set()
        for job in jobs:
            await asyncio.wait_for(job.future, TIMEOUT)
        scheduler.admission.admit(500)  # 500 tokens queued: ~6 s at ~80 tokens/s
        return scheduler.admission.retry_after()

    assert asyncio.run(scenario()) < 25  # per-request latency would say ~50 s
