"""The reward client against a real service behind a fault injector: retries, chunking, pinning."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from faults import Fault, Faults
from live import Live, free_socket, live_server

from rl_client.client import AsyncRewardClient, RewardClient
from rl_client.errors import (
    ItemTooLarge,
    ModelMismatch,
    RequestFailed,
    ServiceUnavailable,
)
from service.protocol import ScoreResponse
from service.settings import Settings

TEXTS = [f"the cat sat on mat number {i}" + " and slept" * (i % 4) for i in range(10)]
FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}


@pytest.fixture(scope="module")
def served(gpt2_rm: Path) -> Iterator[tuple[Live, Faults]]:
    """The tiny GPT-2 RM served behind a fault injector (module-wide)."""
    holder: list[Faults] = []

    def wrap(app: object) -> Faults:
        holder.append(Faults(app))
        return holder[0]

    settings = Settings.model_validate({"model": gpt2_rm, "max_items_per_request": 8})
    with live_server(settings, wrap=wrap) as live:
        yield live, holder[0]


@pytest.fixture
def faults(served: tuple[Live, Faults]) -> Faults:
    """The injector, with no plan and no history."""
    injector = served[1]
    injector.plan.clear()
    injector.seen.clear()
    injector.max_in_flight = 0
    return injector


@pytest.fixture
def url(served: tuple[Live, Faults]) -> str:
    """The live server's base URL."""
    return served[0].url


def approx(values: list[float]) -> object:
    """Equal up to float32 rounding: the server batches requests differently each time."""
    return pytest.approx(values, rel=1e-5, abs=1e-6)


def direct(url: str, texts: list[str]) -> list[float]:
    """Rewards from one plain POST /v1/score."""
    body = {"items": [{"text": t} for t in texts]}
    response = httpx.post(f"{url}/v1/score", json=body, timeout=60)
    response.raise_for_status()
    return [r.reward for r in ScoreResponse.model_validate_json(response.content).results]


def test_score_chunks_to_limits_and_keeps_order(url: str, faults: Faults) -> None:
    expected = direct(url, TEXTS[:8])
    expected += direct(url, TEXTS[8:])
    faults.seen.clear()
    with RewardClient(url, chunk_items=3) as client:
        batch = client.score(TEXTS)
    assert batch.rewards == approx(expected)
    assert [r.index for r in batch.results if r is not None] == list(range(10))
    assert [s.items() for s in faults.hits("/v1/score")] == [3, 3, 3, 1]
    # Without chunk_items the server's advertised limit (8 per request) bounds a request.
    faults.seen.clear()
    with RewardClient(url) as client:
        assert client.score(TEXTS).rewards == approx(expected)
    assert sorted(s.items() for s in faults.hits("/v1/score")) == [2, 8]


def test_retries_on_429_honouring_retry_after(url: str, faults: Faults) -> None:
    faults.then(Fault(status=429, retry_after="1"))
    with RewardClient(url, **FAST) as client:
        client.models()
        faults.then(Fault(status=429, retry_after="1"), Fault(status=503))
        start = time.monotonic()
        batch = client.score(TEXTS[:2])
        elapsed = time.monotonic() - start
    assert batch.rewards == approx(direct(url, TEXTS[:2]))
    statuses = [s.fault.status if s.fault else 200 for s in faults.hits("/v1/score")]
    assert statuses[:3] == [429, 503, 200]
    assert elapsed >= 1.0, "Retry-After: 1 was not honoured"


def test_never_retries_other_4xx(url: str, faults: Faults) -> None:
    with RewardClient(url, **FAST) as client:
        client.models()
        faults.then(Fault(status=422, type="invalid_request"))
        with pytest.raises(RequestFailed, match="422 invalid_request") as caught:
            client.score(TEXTS[:2])
    assert caught.value.status == 422
    assert len(faults.hits("/v1/score")) == 1


def test_exhausted_retries_raise_or_give_none_never_zero(url: str, faults: Faults) -> None:
    with RewardClient(url, max_retries=2, chunk_items=2, **FAST) as client:
        client.models()
        faults.then(*[Fault(status=503)] * 3)
        with pytest.raises(ServiceUnavailable, match="after 3 attempts") as caught:
            client.score(TEXTS[:2])
        assert caught.value.status == 503
        # Policy "none": the failed request's items get None, the other request's are scored.
        faults.plan.clear()
        faults.then(*[Fault(status=503, when=b"number 0")] * 3)
        batch = client.score(TEXTS[:4], on_failure="none")
    good = direct(url, TEXTS[:4])
    rewards = batch.rewards
    assert rewards[:2] == [None, None]
    assert set(batch.failures) == {0, 1}
    assert [r for r in rewards if r is not None] == approx(
        [g for r, g in zip(rewards, good, strict=True) if r is not None]
    )
    assert all(isinstance(e, ServiceUnavailable) for e in batch.failures.values())


def test_read_timeout_is_retried(url: str, faults: Faults) -> None:
    with RewardClient(url, timeout_s=0.3, **FAST) as client:
        client.models()
        faults.then(Fault(delay_s=1.0))
        assert client.score(TEXTS[:1]).rewards == approx(direct(url, TEXTS[:1]))
    assert len(faults.hits("/v1/score")) >= 2


def test_waits_for_a_server_that_is_not_up_yet(gpt2_rm: Path) -> None:
    sock = free_socket()  # bound, not listening: connections are refused until it serves
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with (
        RewardClient(url, max_retries=1, **FAST) as client,
        pytest.raises(ServiceUnavailable, match=r"ConnectError.*after 2 attempts"),
    ):
        client.models()
    # A trainer that starts before its reward server: refused connections, then 503 while
    # the model loads, then the rewards.
    with RewardClient(url, max_retries=1000, backoff_base_s=0.02, backoff_max_s=0.1) as client:
        pending = client.score_future(TEXTS[:2])
        time.sleep(0.3)
        assert not pending.done()
        with live_server(Settings.model_validate({"model": gpt2_rm}), sock=sock, ready=False):
            rewards = pending.result(timeout=120).rewards
            assert rewards == approx(direct(url, TEXTS[:2]))


def test_fingerprint_pinning(url: str, faults: Faults) -> None:
    with RewardClient(url) as client:
        card = client.models()
    with RewardClient(url, expected_fingerprint=card.fingerprint) as client:
        assert client.score(TEXTS[:1]).rewards == approx(direct(url, TEXTS[:1]))
    with (
        RewardClient(url, expected_fingerprint="0" * 64, on_failure="none") as client,
        pytest.raises(ModelMismatch, match="expected 0000"),
    ):
        client.score(TEXTS[:1])


def test_a_model_swapped_behind_the_url_is_noticed(served: tuple[Live, Faults]) -> None:
    live = served[0]
    assert live.state.model is not None
    original = live.state.model
    with RewardClient(live.url, expected_fingerprint=original.fingerprint) as client:
        client.score(TEXTS[:1])
        # A rolling update puts another model behind the same URL mid-run.
        live.state.model = dataclasses.replace(original, fingerprint="f" * 64)
        try:
            with pytest.raises(ModelMismatch, match="serves model fingerprint ffff"):
                client.score(TEXTS[:1])
        finally:
            live.state.model = original


def test_auth_errors_raise_even_with_policy_none(url: str, faults: Faults) -> None:
    with RewardClient(url, on_failure="none") as client:
        client.models()
        faults.then(Fault(status=401, type="unauthorized"))
        with pytest.raises(RequestFailed, match="401"):
            client.score(TEXTS[:1])


def test_oversized_item_is_not_sent(url: str, faults: Faults) -> None:
    huge = "x" * 200_001  # the server's default max_chars_per_item is 200000
    with RewardClient(url) as client:
        with pytest.raises(ItemTooLarge, match=r"items\[1\]: 200001 characters"):
            client.score([TEXTS[0], huge])
        batch = client.score([TEXTS[0], huge], on_failure="none")
    assert batch.rewards[1] is None
    assert batch.rewards[:1] == approx(direct(url, TEXTS[:1]))
    assert all(s.items() == 1 for s in faults.hits("/v1/score"))


def test_concurrency_is_bounded(url: str, faults: Faults) -> None:
    faults.then(*[Fault(delay_s=0.2)] * 6)

    async def run() -> list[float | None]:
        async with AsyncRewardClient(url, chunk_items=1, max_concurrency=2) as client:
            return (await client.score(TEXTS[:6])).rewards

    assert asyncio.run(run()) == approx(direct(url, TEXTS[:6]))
    assert faults.max_in_flight == 2


def test_client_pickles_as_its_config(url: str) -> None:
    with RewardClient(url, chunk_items=2, api_key="k") as client:
        client.models()
        clone = pickle.loads(pickle.dumps(client))
    assert clone.config == client.config
    with clone:
        assert clone.score(TEXTS[:3]).rewards == approx(direct(url, TEXTS[:3]))


def test_rerank_matches_the_service_and_beyond_one_request(url: str) -> None:
    candidates = TEXTS[:6]
    with RewardClient(url) as client:
        small = client.rerank(candidates, prompt="Tell me about cats.")
        # 10 candidates exceed the server's 8 items per request: scored in chunks, ranked here.
        large = client.rerank(TEXTS, prompt="Tell me about cats.", top_k=3)
    body = {"prompt": "Tell me about cats.", "candidates": candidates}
    reference = httpx.post(f"{url}/v1/rerank", json=body, timeout=60).json()
    assert small.id != reference.pop("id")  # every response has its own id
    assert small.model_dump(exclude={"id"}) == reference
    rewards = [
        r.reward
        for r in sorted(
            RewardClient(url)
            .score([{"prompt": "Tell me about cats.", "response": t} for t in TEXTS])
            .results,
            key=lambda r: -r.reward if r else 0,
        )
        if r is not None
    ]
    assert [r.reward for r in large.results] == approx(rewards[:3])
    assert [r.rank for r in large.results] == [0, 1, 2]
    assert large.usage.items == 10


def test_the_client_asks_for_a_normalisation(calibrated_llama: Path) -> None:
    texts = [f"the cat sat on mat {i}" for i in range(3)]
    settings = Settings.model_validate({"model": calibrated_llama, "max_length": 512})
    with live_server(settings) as live, RewardClient(live.url) as client:
        raw = client.score(texts)
        z = client.score(texts, normalize="zscore")
        card = client.models()
    calibration = card.scale.calibration
    assert calibration is not None
    for r, n in zip(raw.results, z.results, strict=True):
        assert r is not None and n is not None and r.raw_reward is None
        assert n.raw_reward == pytest.approx(r.reward)
        assert n.reward == pytest.approx((r.reward - calibration.mean) / calibration.std)
