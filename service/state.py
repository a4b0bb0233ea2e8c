"""The running service: model loading, readiness, draining, and the shared scoring path."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import numpy as np
from starlette.requests import Request

from service.admission import QueueLimits, Scheduler
from service.backends.base import ContinuousBackend
from service.batcher import Batcher
from service.batching import BatchLimits
from service.continuous import ContinuousScheduler
from service.encoding import Encoded
from service.errors import ErrorType, ServiceError
from service.loader import LoadedModel, load_model
from service.metrics import Metrics
from service.protocol import Item, Usage
from service.self_check import SelfCheck, SelfCheckFailed, run_self_check, verdict
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """One request's outputs (n_items, num_labels) with its encodings."""

    outputs: np.ndarray
    encoded: list[Encoded]
    model_id: str
    fingerprint: str
    rewards: list[float]  # the reward head's output per item

    def vector(self, index: int) -> list[float] | None:
        """Every output of item `index` for multi-head models, else None."""
        row = self.outputs[index]
        return [float(x) for x in row] if len(row) > 1 else None

    def usage(self) -> Usage:
        """Items, tokens and truncations of the request."""
        return Usage(
            items=len(self.encoded),
            tokens=sum(len(e.ids) for e in self.encoded),
            truncated_items=sum(e.truncated for e in self.encoded),
        )


def lower_priority(increment: int) -> None:
    """Add `increment` to the calling thread's niceness (on Linux, nice is per thread)."""
    tid = threading.get_native_id()
    nice = os.getpriority(os.PRIO_PROCESS, tid)
    os.setpriority(os.PRIO_PROCESS, tid, min(19, nice + increment))


class ServiceState:
    """What the routes share: settings, metrics, the model once loaded, the scheduler."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model: LoadedModel | None = None
        self.scheduler: Scheduler | None = None
        self.self_check: SelfCheck | None = None
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self.on_fatal: Callable[[str], None] | None = None
        self.tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="warm-tokenize")
        # Loading, warm-up and every forward pass run on this one thread, bar the forwards
        # run beside it on a CPU (see Batcher.start).
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="warm-model")
        metrics.ready.set_function(lambda: float(self.ready and not self.draining))

    async def load(self, preloaded: LoadedModel | None = None) -> None:
        """Load the model in a thread, start the scheduler, then report ready."""
        try:
            await self._load(preloaded)
        except Exception as error:  # startup boundary: report, then let the server exit
            self.load_error = f"{type(error).__name__}: {error}"
            log.error("cannot serve the model: %s", self.load_error)
            if self.on_fatal is not None:
                self.on_fatal(self.load_error)

    async def _load(self, preloaded: LoadedModel | None) -> None:
        loop = asyncio.get_running_loop()
        if preloaded is None:
            model = await loop.run_in_executor(self.model_thread, load_model, self.settings)
        else:
            model = preloaded
        s = self.settings
        queue = QueueLimits(s.max_queue_requests, s.max_queue_tokens, s.max_wait_ms / 1000)
        if s.continuous:
            backend = cast(ContinuousBackend, model.backend)
            self.scheduler = ContinuousScheduler(backend, queue, self.metrics)
        else:
            limits = BatchLimits(model.batch_size, model.batch_tokens, model.overhead_tokens)
            self.scheduler = Batcher(model.backend, limits, queue, self.metrics, model.cores)
        await self.scheduler.start(self.model_thread)
        self.self_check = await self._self_check(model)
        if s.front_nice:
            # The tokeniser thread first: it may be created now, from this thread.
            await loop.run_in_executor(self.tokenizer_pool, lower_priority, s.front_nice)
            lower_priority(s.front_nice)  # the event loop: HTTP, JSON, admission
        self.metrics.thread_cpu.register("event_loop")
        await loop.run_in_executor(
            self.tokenizer_pool, self.metrics.thread_cpu.register, "tokenizer"
        )
        self.model = model
        info = model.backend.info
        if info.backend == "vllm":
            from service.backends.vllm import EngineMetrics

            self.metrics.registry.register(EngineMetrics())
        self.metrics.model_info.labels(
            model.model_id, model.fingerprint, info.dtype, info.device, info.backend
        ).set(1)
        self.ready = True
        if s.continuous:
            how = "vLLM's engine schedules items continuously"
        else:
            how = (
                f"batches <= {model.batch_size} items, <= {model.batch_tokens} padded tokens, "
                f"overhead {model.overhead_tokens:.0f} tokens"
            )
        log.info(
            "serving %s (%s%s, %s on %s, max %d tokens; %s)",
            model.model_id, info.architecture, ", torch.compile" if info.compiled else "",
            info.dtype, info.device, info.max_length, how,
        )  # fmt: skip

    async def _self_check(self, model: LoadedModel) -> SelfCheck:
        """Score the golden set through the scheduler just started; SelfCheckFailed under
        --self-check fail when it fails (the load fails: never ready, the server exits)."""
        assert self.scheduler is not None
        s = self.settings
        if model.calibration is None:
            log.info("no golden set in the model (warm-merge calibrate makes one): no self-check")
            result = SelfCheck("skipped", detail="no golden set")
        elif not model.calibration.golden:
            detail = "the calibration's golden set is empty (every response was truncated)"
            log.warning("no self-check: %s", detail)
            result = SelfCheck("skipped", detail=detail)
        elif s.self_check == "off":
            result = SelfCheck("off")
        else:
            result = verdict(
                await run_self_check(
                    self.scheduler,
                    model.encoder,
                    model.calibration,
                    model.backend.info.dtype,
                    reward_index=s.reward_index,
                    tf32=model.tf32,
                    override=s.self_check_tolerance,
                ),
                s.self_check,
            )
        self.metrics.self_check.labels(result.status).set(1)
        deviation = result.max_deviation
        self.metrics.self_check_deviation.set(math.inf if deviation is None else deviation)
        if result.status == "failed":
            raise SelfCheckFailed(result.detail)
        return result

    def start_draining(self) -> None:
        """Stop reporting ready (SIGTERM): load balancers stop sending new work."""
        if not self.draining:
            log.info("draining: not ready; finishing in-flight requests")
        self.draining = True  # only a flag: this runs inside a signal handler

    async def close(self) -> None:
        """Finish admitted work (bounded by the grace period) and release the model."""
        self.start_draining()
        self.ready = False
        if self.scheduler is not None:
            await self.scheduler.stop(self.settings.graceful_shutdown_s)
        self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        self.model_thread.shutdown(wait=False, cancel_futures=True)
        if self.model is not None:
            self.model.backend.close()

    def serving(self) -> LoadedModel:
        """The model, or 503 while loading, after a failed load, while draining, or once the
        model can no longer serve (a dead engine: the server then exits)."""
        if self.model is not None and self.ready and (reason := self.model.backend.failure()):
            self.ready = False
            self.load_error = reason
            log.error("cannot serve any more: %s", reason)
            if self.on_fatal is not None:
                self.on_fatal(reason)
        if self.model is None or not self.ready:
            message = self.load_error or "the model is still loading"
            raise ServiceError(ErrorType.NOT_READY, message, retry_after=5)
        return self.model

    def check_items(self, items: list[Item]) -> None:
        """Per-request limits (422), naming the offending item."""
        s = self.settings
        if len(items) > s.max_items_per_request:
            raise ServiceError(
                ErrorType.INVALID_REQUEST,
                f"{len(items)} items, more than max_items_per_request ({s.max_items_per_request})",
            )
        for index, item in enumerate(items):
            if (chars := item.n_chars()) > s.max_chars_per_item:
                raise ServiceError(
                    ErrorType.INVALID_REQUEST,
                    f"items[{index}]: {chars} characters, more than "
                    f"max_chars_per_item ({s.max_chars_per_item})",
                )

    async def score(
        self,
        request: Request,
        items: list[Item],
        side: str | None,
        *,
        max_length: int | None = None,
        special_tokens: bool = True,
        truncate: bool = True,
    ) -> Scored:
        """Render, tokenise, queue and await one request's items; drop them if the client goes.

        `max_length`: a per-request cut below the model's; `special_tokens`: False scores the
        texts' own tokens only (no BOS added); `truncate`: False refuses over-long items (422)
        before they are queued."""
        arrival = time.monotonic()
        model = self.serving()
        self.check_items(items)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        encode = partial(model.encoder.encode, max_length=max_length, special_tokens=special_tokens)
        encoded = await loop.run_in_executor(
            self.tokenizer_pool, encode, items, side or self.settings.truncation_side
        )
        self.metrics.tokenize_latency.observe(time.perf_counter() - started)
        if not truncate and (cut := [i for i, e in enumerate(encoded) if e.truncated]):
            raise ServiceError(
                ErrorType.INVALID_REQUEST,
                f"Input validation error: `inputs` must have less than "
                f"{model.encoder.max_length} tokens (items[{cut[0]}] has more)",
            )
        return await self._run(request, model, encoded, arrival)

    async def score_ids(
        self,
        request: Request,
        sequences: list[list[int]],
        side: str | None,
        *,
        max_length: int | None = None,
    ) -> Scored:
        """Score token ids the client tokenised itself (checked against the vocabulary)."""
        arrival = time.monotonic()
        model = self.serving()
        if len(sequences) > self.settings.max_items_per_request:
            raise ServiceError(
                ErrorType.INVALID_REQUEST,
                f"{len(sequences)} inputs, more than max_items_per_request "
                f"({self.settings.max_items_per_request})",
            )
        encoded = model.encoder.encode_ids(
            sequences, side or self.settings.truncation_side, max_length=max_length
        )
        return await self._run(request, model, encoded, arrival)

    async def _run(
        self, request: Request, model: LoadedModel, encoded: list[Encoded], arrival: float
    ) -> Scored:
        """Queue encoded items and await their outputs, bounded by the request's deadline."""
        assert self.scheduler is not None
        deadline = arrival + self.settings.request_timeout_s
        job = self.scheduler.submit([e.ids for e in encoded], deadline)
        gone = asyncio.create_task(_disconnected(request))
        waiting: set[asyncio.Future[Any]] = {job.future, gone}
        try:
            done, _ = await asyncio.wait(
                waiting,
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:  # the server gave up on this request (forced stop)
            self.scheduler.cancel(job, "cancelled")
            raise
        finally:
            gone.cancel()
        if job.future in done:
            if (error := job.future.exception()) is not None:
                if model.backend.failure() is not None:
                    self.serving()  # a dead engine: report it (503) and stop serving
                raise error
            outputs = job.future.result()
        elif gone in done:
            self.scheduler.cancel(job, "disconnected")
            raise ServiceError(ErrorType.CLIENT_CLOSED, "client disconnected")
        else:
            self.scheduler.cancel(job, "deadline")
            raise ServiceError(
                ErrorType.DEADLINE_EXCEEDED,
                f"not scored within request_timeout_s ({self.settings.request_timeout_s} s)",
            )
        if not np.isfinite(outputs).all():
            bad = int(np.flatnonzero(~np.isfinite(outputs).all(axis=1))[0])
            raise ServiceError(
                ErrorType.BACKEND_ERROR, f"items[{bad}]: the model produced a non-finite output"
            )
        rewards = [float(r) for r in outputs[:, self.settings.reward_index]]
        for reward in rewards:
            self.metrics.rewards.observe(reward)
        return Scored(outputs, encoded, model.model_id, model.fingerprint, rewards)


async def _disconnected(request: Request) -> None:
    """Return once the client has closed its connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
