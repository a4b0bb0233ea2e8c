"""What a GPU does that a CPU test cannot: out-of-memory batches and a broken CUDA context,
raised by fake and patched backends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from live import live_server
from tiny_models import make_rm
from transformers import AutoTokenizer

from service.admission import QueueLimits
from service.backends.base import ModelInfo, OutOfMemory
from service.batcher import Batcher
from service.batching import BatchLimits
from service.budget import Calibration, calibrate
from service.encoding import Encoder
from service.errors import ErrorType, ServiceError
from service.loader import LoadError, load_model
from service.metrics import Metrics
from service.settings import Settings


class OutOfMemoryAbove:
    """A backend whose device holds a forward of n items padded to L tokens while
    n * L ** `power` is at most `capacity` (power 2: memory that attention fills); its output
    for an item is the sum of its ids."""

    def __init__(self, capacity: int, power: int = 1) -> None:
        self.capacity = capacity
        self.power = power
        self.info = ModelInfo("Fake", 1, "bfloat16", "cuda:0", max_length=8, backend="fake")
        self.batches: list[int] = []  # sizes of the forwards that fit
        self.freed = 0

    def forward(self, sequences: Sequence[Sequence[int]], threads: int | None = None) -> np.ndarray:
        if max(len(s) for s in sequences) ** self.power * len(sequences) > self.capacity:
            raise OutOfMemory("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.batches.append(len(sequences))
        return np.array([[float(sum(s))] for s in sequences])

    def failure(self) -> str | None:
        return None

    def free_memory(self) -> None:
        self.freed += 1

    def close(self) -> None:
        pass


def run_jobs(backend: OutOfMemoryAbove, jobs: list[list[list[int]]]) -> tuple[Batcher, list]:
    """Submit every job at once to a batcher over `backend`; (batcher, each job's outcome)."""

    async def main() -> tuple[Batcher, list]:
        limits = BatchLimits(max_batch_size=64, max_batch_tokens=4096)
        batcher = Batcher(backend, limits, QueueLimits(100, 100_000), Metrics())
        with ThreadPoolExecutor(1) as model_thread:
            await batcher.start(model_thread)
            submitted = [batcher.submit(job, time.monotonic() + 30) for job in jobs]
            outcomes = await asyncio.gather(*(j.future for j in submitted), return_exceptions=True)
            await batcher.stop(5)
        return batcher, outcomes

    return asyncio.run(main())


def test_a_batch_out_of_memory_is_halved_and_retried_losing_nothing() -> None:
    backend = OutOfMemoryAbove(capacity=20)  # 2 items of 8 tokens fit, 3 do not
    jobs = [[[i] * 8] for i in range(1, 9)]  # 8 one-item requests, 64 padded tokens together
    batcher, outcomes = run_jobs(backend, jobs)
    assert [o[0][0] for o in outcomes] == [8.0 * i for i in range(1, 9)]  # every item, right
    assert max(backend.batches) <= 2 and sum(backend.batches) == 8
    assert backend.freed >= 1  # the cache was emptied before the retry
    # The budget fell below what failed, never below one longest item.
    assert backend.info.max_length <= batcher.limits.max_batch_tokens <= 32
    assert batcher.metrics.out_of_memory._value.get() >= 1


def test_one_item_that_does_not_fit_fails_alone_and_the_batcher_goes_on() -> None:
    backend = OutOfMemoryAbove(capacity=6)  # no 8-token item fits; 4-token ones do
    _, outcomes = run_jobs(backend, [[[1] * 8], [[2] * 4]])
    failed = [o for o in outcomes if isinstance(o, ServiceError)]
    assert len(failed) == 1 and failed[0].type is ErrorType.BACKEND_ERROR
    assert "OutOfMemory" in failed[0].message
    assert next(o for o in outcomes if not isinstance(o, Exception))[0][0] == 8.0


def test_a_device_side_assert_turns_the_replica_unready_and_stops_it(gpt2_rm: Path) -> None:
    settings = Settings.model_validate({"model": gpt2_rm, "warmup": False})
    with live_server(settings) as live, live.client() as client:
        fatal: list[str] = []
        live.state.on_fatal = fatal.append
        assert live.state.model is not None
        backend = live.state.model.backend

        def broken(**_: object) -> None:
            raise RuntimeError("CUDA error: device-side assert triggered\nCompile with ...")

        backend.run = broken  # type: ignore[attr-defined]
        score = client.post("/v1/score", json={"items": [{"text": "hello"}]})
        ready = client.get("/ready")
        again = client.post("/v1/score", json={"items": [{"text": "hello"}]})
    assert score.status_code == 503 and "device-side assert" in score.text
    assert ready.status_code == 503 and again.status_code == 503
    assert fatal == ["the device failed for good: CUDA error: device-side assert triggered"]


def test_any_other_failing_forward_fails_its_batch_only(gpt2_rm: Path) -> None:
    settings = Settings.model_validate({"model": gpt2_rm, "warmup": False})
    with live_server(settings) as live, live.client() as client:
        assert live.state.model is not None
        backend = live.state.model.backend
        working = backend.run  # type: ignore[attr-defined]

        def once(**_: object) -> None:
            backend.run = working  # type: ignore[attr-defined]
            raise RuntimeError("a bad batch")

        backend.run = once  # type: ignore[attr-defined]
        failed = client.post("/v1/score", json={"items": [{"text": "hello"}]})
        served = client.post("/v1/score", json={"items": [{"text": "hello"}]})
        ready = client.get("/ready")
    assert failed.status_code == 500 and served.status_code == 200 and ready.status_code == 200
    assert backend.failure() is None


@pytest.mark.parametrize("message", ["CUDA out of memory. Tried to allocate 1.00 GiB"])
def test_the_transformers_backend_reports_out_of_memory_as_such(
    gpt2_rm: Path, message: str
) -> None:
    import torch

    from service.backends.transformers import TransformersBackend

    backend = TransformersBackend(
        gpt2_rm, device="cpu", dtype="auto", max_length=16, pad_token_id=0, trust_remote_code=False
    )

    def oom(**_: object) -> None:
        raise torch.OutOfMemoryError(message)

    backend.run = oom
    with pytest.raises(OutOfMemory, match="Tried to allocate"):
        backend.forward([[5, 6]])
    assert backend.failure() is None  # memory, not a broken device


def test_a_tokenizer_with_ids_past_the_embedding_is_refused_at_load(
    tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    # The tiny tokenizer has 300 ids; an embedding of 200 rows would crash a GPU mid-serving.
    model = make_rm(
        tmp_path / "rm",
        "gpt2",
        seed=0,
        tokenizer_dir=tiny_tokenizer_dir,
        config_overrides={"vocab_size": 200},
    )
    with pytest.raises(LoadError, match="token id 299, but the model's embedding has 200 rows"):
        load_model(Settings.model_validate({"model": model, "warmup": False}))


@pytest.fixture(scope="module")
def long_encoder(bert_rm: Path) -> Encoder:
    """Items of up to 256 tokens: warm-up times 128-token items, then confirms with 256."""
    return Encoder(AutoTokenizer.from_pretrained(bert_rm), max_length=256, separator="\n")


def test_warm_up_stops_doubling_at_the_first_batch_out_of_memory(long_encoder: Encoder) -> None:
    backend = OutOfMemoryAbove(capacity=4 * 128 + 100)  # 4 items of 128 tokens fit, 8 do not
    got = calibrate(backend, long_encoder, 64, 16384)  # type: ignore[arg-type]
    assert 8 not in backend.batches and 4 in backend.batches
    assert backend.freed == 1
    # Never more than ran: 4 x 128 tokens, confirmed by 2 items of 256.
    assert long_encoder.max_length <= got.batch_tokens <= 4 * 128
    assert backend.batches[-1] == got.batch_tokens // 256


def test_warm_up_halves_a_budget_that_the_longest_items_do_not_fit(
    long_encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Memory grows with the square of the length: 4 items of 128 tokens fit, and so does
    # one item of 256, but not 2: the 512-token budget the short items' timings chose.
    monkeypatch.setattr("service.budget.choose_budget", lambda *_, **__: Calibration(0.0, 512))
    backend = OutOfMemoryAbove(capacity=4 * 128**2, power=2)
    got = calibrate(backend, long_encoder, 64, 16384)  # type: ignore[arg-type]
    assert got.batch_tokens == 256
    assert backend.freed == 2  # the doubling's failure, then the confirmation's
    assert backend.batches[-1] == 1


def test_warm_up_fails_when_one_item_of_the_longest_length_does_not_fit(
    long_encoder: Encoder,
) -> None:
    backend = OutOfMemoryAbove(capacity=128**2 + 1, power=2)  # one 128-token item, no 256
    with pytest.raises(OutOfMemory, match=r"one item of 256 tokens .* lower --max-length"):
        calibrate(backend, long_encoder, 64, 16384)  # type: ignore[arg-type]


def test_a_model_that_cannot_warm_up_is_refused_at_load(
    bert_rm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(*_: object, **__: object) -> None:
        raise OutOfMemory("one item of 512 tokens does not fit the device's memory")

    monkeypatch.setattr("service.loader.calibrate", oom)
    with pytest.raises(LoadError, match="warm-up: one item of 512 tokens does not fit"):
        load_model(Settings.model_validate({"model": bert_rm, "device": "cpu"}))
