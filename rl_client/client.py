"""The reward client: pooled HTTP to a warm-serve endpoint, with retries, chunking and pinning.

`AsyncRewardClient` does the work on an asyncio loop. `RewardClient` is its synchronous
face: it runs one on a private event-loop thread, so a trainer can also start a request,
keep computing and collect the result later (`score_future`). Both pickle as their
configuration (a worker process opens its own connections on first use).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from rl_client.errors import (
    ItemTooLarge,
    ModelMismatch,
    RequestFailed,
    RewardClientError,
    ServiceUnavailable,
)
from rl_client.retry import RETRY_STATUSES, parse_retry_after, plan_chunks, retry_delay
from service.protocol import (
    FINGERPRINT_HEADER,
    Item,
    Message,
    ModelCard,
    ModelList,
    Normalize,
    RerankRequest,
    RerankResponse,
    ScoreResponse,
    ScoreResult,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
FailurePolicy = Literal["raise", "none"]
ItemLike = Item | str | Mapping[str, Any]
# Errors that say the client is misconfigured: never turned into a `None` reward.
CONFIG_STATUSES = frozenset({401, 403, 404, 405})


class ClientConfig(BaseModel):
    """Everything a reward client needs; a client pickles as this."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: str = Field(description="The service's base URL, e.g. http://rm:8000.")
    api_key: SecretStr | None = Field(None, description="Sent as `Authorization: Bearer`.")
    timeout_s: float = Field(120.0, gt=0, description="Read timeout of one HTTP attempt.")
    connect_timeout_s: float = Field(5.0, gt=0, description="Connect timeout of one attempt.")
    max_retries: int = Field(6, ge=0, description="Retries after the first attempt.")
    backoff_base_s: float = Field(0.5, gt=0, description="First backoff; doubles per retry.")
    backoff_max_s: float = Field(30.0, gt=0, description="Longest backoff between attempts.")
    max_concurrency: int = Field(8, ge=1, description="Requests in flight from this client.")
    chunk_items: int | None = Field(
        None, ge=1, description="Items per request (default: the server's max batch size)."
    )
    on_failure: FailurePolicy = Field(
        "raise",
        description="'raise', or 'none': an item whose request failed gets None (never 0). "
        "Authentication, routing and model-pinning errors always raise.",
    )
    expected_fingerprint: str | None = Field(
        None, description="Pin the served model: any other fingerprint is an error."
    )


@dataclass
class ScoreBatch:
    """Results of one `score` call in item order; `None` where an item failed."""

    results: list[ScoreResult | None]
    failures: dict[int, RewardClientError] = field(default_factory=dict)
    model: str | None = None

    @property
    def rewards(self) -> list[float | None]:
        """The reward of each item, `None` where it failed (TRL's "no reward")."""
        return [r.reward if r is not None else None for r in self.results]


def to_item(value: ItemLike) -> Item:
    """An item from an `Item`, a plain text, or a dict of the item's fields."""
    if isinstance(value, Item):
        return value
    if isinstance(value, str):
        return Item(text=value)
    return Item.model_validate(dict(value))


def _error_of(response: httpx.Response) -> tuple[str, str]:
    """(type, message) of an error response, from the service's envelope when it has one."""
    try:
        error = response.json()["error"]
        return str(error["type"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return "http_error", response.text[:200] or response.reason_phrase


class AsyncRewardClient:
    """Async client of a warm-serve endpoint: `score`, `rerank`, `models`."""

    def __init__(self, base_url: str | None = None, **options: Any) -> None:
        config = options.pop("config", None)
        if config is None:
            config = ClientConfig(base_url=base_url, **options)
        elif base_url is not None or options:
            raise TypeError("give either a config or keyword options, not both")
        self.config: ClientConfig = config
        self._http: httpx.AsyncClient | None = None
        self._gate: asyncio.Semaphore | None = None
        self._card: ModelCard | None = None
        self._random = random.Random()

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(config=state["config"])  # type: ignore[misc]

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        if self._http is None or self._gate is None:
            c = self.config
            headers = {"user-agent": "warm-rm-client"}
            if c.api_key is not None:
                headers["authorization"] = f"Bearer {c.api_key.get_secret_value()}"
            limit = httpx.Limits(max_connections=c.max_concurrency, max_keepalive_connections=None)
            self._http = httpx.AsyncClient(
                base_url=c.base_url.rstrip("/"),
                headers=headers,
                timeout=httpx.Timeout(c.timeout_s, connect=c.connect_timeout_s),
                limits=limit,
            )
            self._gate = asyncio.Semaphore(c.max_concurrency)
        return self._http, self._gate

    async def _request(
        self, method: str, path: str, body: bytes | None = None, timeout_s: float | None = None
    ) -> httpx.Response:
        """Send with bounded retries on 429/502/503/504 and transport errors."""
        http, gate = self._client()
        c = self.config
        timeout = httpx.USE_CLIENT_DEFAULT
        if timeout_s is not None:
            timeout = httpx.Timeout(timeout_s, connect=c.connect_timeout_s)  # type: ignore[assignment]
        headers = {"content-type": "application/json"} if body is not None else None
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            status: int | None = None
            try:
                async with gate:
                    response = await http.request(
                        method, path, content=body, headers=headers, timeout=timeout
                    )
            except httpx.TransportError as error:
                reason = f"{method} {path}: {type(error).__name__}: {error}".rstrip(": ")
            else:
                if response.is_success:
                    self._check_fingerprint(response.headers.get(FINGERPRINT_HEADER))
                    return response
                status = response.status_code
                kind, message = _error_of(response)
                if status not in RETRY_STATUSES:
                    raise RequestFailed(status, kind, message)
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                reason = f"{method} {path}: HTTP {status} {kind}: {message}"
            if attempt > c.max_retries:
                raise ServiceUnavailable(reason, attempts=attempt, status=status)
            delay = retry_delay(
                attempt - 1,
                base_s=c.backoff_base_s,
                max_s=c.backoff_max_s,
                retry_after_s=retry_after,
                jitter=self._random.random(),
            )
            log.warning("%s; retry %d in %.2f s", reason, attempt, delay)
            await asyncio.sleep(delay)

    def _check_fingerprint(self, served: str | None) -> None:
        expected = self.config.expected_fingerprint
        if expected is not None and served is not None and served != expected:
            raise ModelMismatch(expected, served)

    async def models(self, refresh: bool = False) -> ModelCard:
        """The served model's card (identity, provenance, limits); cached after the first call."""
        if self._card is None or refresh:
            response = await self._request("GET", "/v1/models")
            cards = ModelList.model_validate_json(response.content).data
            if not cards:
                raise RewardClientError("the service lists no model")
            self._check_fingerprint(cards[0].fingerprint)
            self._card = cards[0]
        return self._card

    async def score(
        self,
        items: Sequence[ItemLike],
        *,
        truncation_side: Literal["left", "right"] | None = None,
        normalize: Normalize | None = None,
        on_failure: FailurePolicy | None = None,
        timeout_s: float | None = None,
    ) -> ScoreBatch:
        """Rewards of `items` in order, sent as concurrent requests within the server's limits.

        `normalize`: what `reward` carries ('none', 'zscore' or 'quantile' over the artifact's
        calibration; default: the server's); a result's `raw_reward` keeps the raw logit."""
        policy = on_failure or self.config.on_failure
        parsed = [to_item(x) for x in items]
        if not parsed:
            return ScoreBatch(results=[])
        limits = (await self.models()).limits
        batch = ScoreBatch(results=[None] * len(parsed))
        bodies = [item.model_dump_json(exclude_none=True).encode() for item in parsed]
        sendable: list[int] = []
        for i, item in enumerate(parsed):
            if item.n_chars() > limits.max_chars_per_item:
                batch.failures[i] = ItemTooLarge(i, item.n_chars(), limits.max_chars_per_item)
            else:
                sendable.append(i)
        wanted = self.config.chunk_items or limits.max_batch_size
        max_items = min(wanted, limits.max_items_per_request)
        chunks = plan_chunks(
            [len(bodies[i]) for i in sendable], max_items=max_items, max_bytes=limits.max_body_bytes
        )
        groups = [[sendable[j] for j in chunk] for chunk in chunks]
        side = f',"truncation_side":"{truncation_side}"' if truncation_side else ""
        side += f',"normalize":"{normalize}"' if normalize else ""

        async def send(group: list[int]) -> None:
            body = b'{"items":[' + b",".join(bodies[i] for i in group) + b"]" + side.encode() + b"}"
            try:
                response = await self._request("POST", "/v1/score", body, timeout_s)
                parsed_response = ScoreResponse.model_validate_json(response.content)
            except (RequestFailed, ServiceUnavailable, ValidationError) as error:
                if policy == "raise" or _is_config_error(error):
                    raise
                failure = error if isinstance(error, RewardClientError) else _malformed(error)
                batch.failures.update(dict.fromkeys(group, failure))
                return
            if len(parsed_response.results) != len(group):
                raise RewardClientError(
                    f"the service returned {len(parsed_response.results)} results "
                    f"for {len(group)} items"
                )
            batch.model = parsed_response.model
            for i, result in zip(group, parsed_response.results, strict=True):
                batch.results[i] = result.model_copy(update={"index": i})

        await _gather_all([send(group) for group in groups])
        if batch.failures:
            if policy == "raise":
                raise next(iter(batch.failures.values()))
            log.warning("%d of %d items got no reward", len(batch.failures), len(parsed))
        return batch

    async def rerank(
        self,
        candidates: Sequence[str],
        *,
        prompt: str | None = None,
        messages: Sequence[Message | Mapping[str, str]] | None = None,
        top_k: int | None = None,
        truncation_side: Literal["left", "right"] | None = None,
        timeout_s: float | None = None,
    ) -> RerankResponse:
        """Candidates for one prompt (or chat), best first, with group advantages."""
        request = RerankRequest(
            prompt=prompt,
            messages=[Message.model_validate(dict(m)) for m in messages]
            if messages is not None
            else None,
            candidates=list(candidates),
            top_k=top_k,
            truncation_side=truncation_side,
        )
        limits = (await self.models()).limits
        body = request.model_dump_json(exclude_none=True).encode()
        if len(candidates) <= limits.max_items_per_request and len(body) <= limits.max_body_bytes:
            response = await self._request("POST", "/v1/rerank", body, timeout_s)
            return RerankResponse.model_validate_json(response.content)
        # More candidates than one request may hold: score them in chunks, rank here.
        scored = await self.score(
            request.items(), truncation_side=truncation_side, on_failure="raise"
        )
        results = [r for r in scored.results if r is not None]
        return RerankResponse.ranking(results, scored.model or "", limit=top_k)

    def as_trl_reward_func(self, name: str = "warm_rm") -> Any:
        """An async, picklable `reward_funcs` entry for TRL's GRPOTrainer/RLOOTrainer."""
        from rl_client.adapters import AsyncTRLRewardFunc

        return AsyncTRLRewardFunc(self.config, name=name)


def _is_config_error(error: Exception) -> bool:
    return isinstance(error, RequestFailed) and error.status in CONFIG_STATUSES


def _malformed(error: ValidationError) -> RewardClientError:
    return RewardClientError(f"malformed response from the service: {error}")


async def _gather_all(coroutines: list[Coroutine[Any, Any, None]]) -> None:
    """Run all; on the first error cancel the rest and raise it (no orphaned requests)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class RewardClient:
    """Synchronous client of a warm-serve endpoint; the same API as `AsyncRewardClient`."""

    def __init__(self, base_url: str | None = None, **options: Any) -> None:
        self._async = AsyncRewardClient(base_url, **options)
        self.config = self._async.config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(config=state["config"])  # type: ignore[misc]

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="warm-rm-client", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def close(self) -> None:
        """Close the connections and stop the client's event-loop thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._async.aclose(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()

    def models(self, refresh: bool = False) -> ModelCard:
        """The served model's card (identity, provenance, limits)."""
        return self._submit(self._async.models(refresh)).result()

    def score(self, items: Sequence[ItemLike], **options: Any) -> ScoreBatch:
        """Rewards of `items` in order (see `AsyncRewardClient.score`)."""
        return self.score_future(items, **options).result()

    def score_future(
        self, items: Sequence[ItemLike], **options: Any
    ) -> concurrent.futures.Future[ScoreBatch]:
        """Start scoring `items` and return at once; `.result()` waits for the batch."""
        return self._submit(self._async.score(items, **options))

    def rerank(self, candidates: Sequence[str], **options: Any) -> RerankResponse:
        """Candidates for one prompt, best first (see `AsyncRewardClient.rerank`)."""
        return self.rerank_future(candidates, **options).result()

    def rerank_future(
        self, candidates: Sequence[str], **options: Any
    ) -> concurrent.futures.Future[RerankResponse]:
        """Start a rerank and return at once; `.result()` waits for it."""
        return self._submit(self._async.rerank(candidates, **options))

    def as_trl_reward_func(self, name: str = "warm_rm") -> Any:
        """A picklable `reward_funcs` entry for TRL's GRPOTrainer/RLOOTrainer."""
        from rl_client.adapters import TRLRewardFunc

        return TRLRewardFunc(self.config, name=name)
