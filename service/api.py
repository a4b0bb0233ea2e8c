"""HTTP routes: validate, delegate to the service state, shape the response."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from service.errors import ErrorType, ServiceError
from service.protocol import (
    FINGERPRINT_HEADER,
    GetRewardRequest,
    GetRewardResponse,
    Item,
    Limits,
    ModelCard,
    ModelList,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
    Status,
)
from service.ranking import rank
from service.state import ServiceState


def state_of(request: Request) -> ServiceState:
    """The service state the app factory attached."""
    state: ServiceState = request.app.state.warm
    return state


def json_response(body: BaseModel, fingerprint: str | None = None) -> Response:
    """Serialise a response model once, in pydantic-core (the hot path skips re-validation).

    Scored responses carry the model's fingerprint in a header, so that a pinned client
    notices a model swapped behind the same URL (a rolling update) on the next call.
    """
    headers = {FINGERPRINT_HEADER: fingerprint} if fingerprint is not None else None
    return Response(content=body.model_dump_json(), media_type="application/json", headers=headers)


async def authorize(request: Request) -> None:
    """Require `Authorization: Bearer KEY` when API keys are configured."""
    keys = state_of(request).settings.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip().encode()
    # Compare against every key in constant time, whatever matches first.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.get_secret_value().encode())
    if scheme.lower() != "bearer" or not matched:
        raise ServiceError(ErrorType.UNAUTHORIZED, "missing or invalid API key")


async def authorize_metrics(request: Request) -> None:
    """Metrics are open unless `protect_metrics` is set."""
    if state_of(request).settings.protect_metrics:
        await authorize(request)


api = APIRouter(dependencies=[Depends(authorize)])
probes = APIRouter()


@api.post("/v1/score", response_model=ScoreResponse)
async def score(body: ScoreRequest, request: Request) -> Response:
    """Rewards of a batch of items, in request order."""
    state = state_of(request)
    scored = await state.score(request, body.items, body.truncation_side)
    results = [
        ScoreResult(
            index=i,
            reward=scored.rewards[i],
            rewards=scored.vector(i),
            n_tokens=len(enc.ids),
            truncated=enc.truncated,
        )
        for i, enc in enumerate(scored.encoded)
    ]
    return json_response(
        ScoreResponse(model=scored.model_id, results=results, usage=scored.usage()),
        scored.fingerprint,
    )


@api.post("/v1/rerank", response_model=RerankResponse)
async def rerank(body: RerankRequest, request: Request) -> Response:
    """Best-of-N: candidates for one prompt, best first, with group-normalised advantages."""
    state = state_of(request)
    scored = await state.score(request, body.items(), body.truncation_side)
    rewards = scored.rewards
    ranking = rank(rewards)
    top = ranking.order[: body.top_k] if body.top_k is not None else ranking.order
    results = [
        RerankResult(
            index=i,
            rank=r,
            reward=rewards[i],
            advantage=ranking.advantages[i],
            rewards=scored.vector(i),
            n_tokens=len(scored.encoded[i].ids),
            truncated=scored.encoded[i].truncated,
        )
        for r, i in enumerate(top)
    ]
    return json_response(
        RerankResponse(
            model=scored.model_id,
            results=results,
            best_index=ranking.order[0],
            mean=ranking.mean,
            std=ranking.std,
            usage=scored.usage(),
        ),
        scored.fingerprint,
    )


@api.post("/get_reward", response_model=GetRewardResponse)
async def get_reward(body: GetRewardRequest, request: Request) -> Response:
    """OpenRLHF's remote reward model protocol: `query` holds full prompt+response texts."""
    state = state_of(request)
    scored = await state.score(request, [Item(text=q) for q in body.query], None)
    rewards = scored.rewards
    return json_response(
        GetRewardResponse(
            rewards=rewards,
            scores=rewards,
            extra_logs={
                "n_tokens": [float(len(e.ids)) for e in scored.encoded],
                "truncated": [float(e.truncated) for e in scored.encoded],
            },
        ),
        scored.fingerprint,
    )


@api.get("/v1/models")
async def models(request: Request) -> ModelList:
    """The served model: identity, provenance, device and the server's limits."""
    state = state_of(request)
    model = state.serving()
    info = model.backend.info
    s = state.settings
    card = ModelCard(
        id=model.model_id,
        fingerprint=model.fingerprint,
        manifest=model.manifest,
        architecture=info.architecture,
        num_labels=info.num_labels,
        dtype=info.dtype,
        device=info.device,
        backend=info.backend,
        compiled=info.compiled,
        max_length=info.max_length,
        chat_template=model.encoder.chat_template,
        limits=Limits(
            max_items_per_request=s.max_items_per_request,
            max_chars_per_item=s.max_chars_per_item,
            max_tokens_per_item=info.max_length,
            max_body_bytes=s.max_body_bytes,
            max_batch_size=s.max_batch_size,
            max_batch_tokens=model.batch_tokens,
        ),
    )
    return ModelList(data=[card])


@probes.get("/health")
async def health() -> Status:
    """Alive: the process answers (the model may still be loading)."""
    return Status(status="ok")


@probes.get("/ready")
async def ready(request: Request) -> Status:
    """Ready: model loaded, warm-up done, not draining; else 503."""
    state = state_of(request)
    if state.draining:
        raise ServiceError(ErrorType.NOT_READY, "draining: the service is shutting down")
    state.serving()
    return Status(status="ready")


@probes.get("/metrics", dependencies=[Depends(authorize_metrics)])
async def metrics(request: Request) -> Response:
    """Prometheus exposition of the `warm_` metrics."""
    data = generate_latest(state_of(request).metrics.registry)
    return Response(content=data, media_type=CONTENT_TYPE_LATEST)
