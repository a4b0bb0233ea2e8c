"""HTTP routes: validate, delegate to the service state, shape the response."""

from __future__ import annotations

import hmac
from dataclasses import asdict

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from service.errors import Dialect, ErrorType, ServiceError
from service.openapi import WarmError, error_responses
from service.protocol import (
    FINGERPRINT_HEADER,
    Document,
    GetRewardRequest,
    GetRewardResponse,
    Item,
    Limits,
    ModelCard,
    ModelList,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
    SelfCheckCard,
    Status,
)
from service.scale import available, normalize, scale_of
from service.state import Scored, ServiceState


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


def results_of(scored: Scored, rewards: list[float] | None = None) -> list[ScoreResult]:
    """Each item's result, in request order; `rewards`: what `reward` carries instead of the
    raw reward (a normalisation: the raw one is then `raw_reward`)."""
    return [
        ScoreResult(
            index=i,
            reward=scored.rewards[i] if rewards is None else rewards[i],
            raw_reward=None if rewards is None else scored.rewards[i],
            rewards=scored.vector(i),
            n_tokens=len(enc.ids),
            truncated=enc.truncated,
        )
        for i, enc in enumerate(scored.encoded)
    ]


@api.post("/v1/score", response_model=ScoreResponse, responses=error_responses(Dialect.WARM))
@api.post("/score", response_model=ScoreResponse, responses=error_responses(Dialect.WARM))
async def score(body: ScoreRequest, request: Request) -> Response:
    """Rewards of a batch of items, in request order (`/score` is the same route)."""
    state = state_of(request)
    how = body.normalize or state.settings.normalize
    calibration = state.serving().calibration
    if how != "none":
        available(how, calibration)  # refused before scoring, not after
    scored = await state.score(request, body.items, body.truncation_side)
    carried = None if how == "none" else normalize(scored.rewards, how, calibration)
    response = ScoreResponse(
        model=scored.model_id,
        normalize=how,
        results=results_of(scored, carried),
        usage=scored.usage(),
    )
    return json_response(response, scored.fingerprint)


@api.post("/v1/rerank", response_model=RerankResponse, responses=error_responses(Dialect.WARM))
async def rerank(body: RerankRequest, request: Request) -> Response:
    """Best-of-N: candidates for one prompt, best first, with group-normalised advantages.
    Takes warm-rm's shape (prompt/messages, candidates) or Cohere/Jina/vLLM's (query,
    documents, top_n, return_documents)."""
    state = state_of(request)
    scored = await state.score(request, body.items(), body.truncation_side)
    documents = None
    if body.echoes_documents():
        given = body.documents or body.responses()
        documents = [Document(text=d) if isinstance(d, str) else d for d in given]
    response = RerankResponse.ranking(
        results_of(scored),
        scored.model_id,
        limit=body.limit(),
        documents=documents,
        activation=body.use_activation is not False
        and state.serving().problem_type != "regression",
    )
    return json_response(response, scored.fingerprint)


@api.post("/get_reward", response_model=GetRewardResponse, responses=error_responses(Dialect.WARM))
async def get_reward(body: GetRewardRequest, request: Request) -> Response:
    """OpenRLHF's remote reward model protocol: `query` holds full prompt+response texts."""
    state = state_of(request)
    scored = await state.score(request, [Item(text=q) for q in body.query], None)
    calibration = state.serving().calibration
    rewards = normalize(scored.rewards, state.settings.normalize, calibration)
    scores = rewards if calibration is None else normalize(scored.rewards, "quantile", calibration)
    return json_response(
        GetRewardResponse(
            rewards=rewards,
            scores=scores,
            extra_logs={
                "n_tokens": [float(len(e.ids)) for e in scored.encoded],
                "truncated": [float(e.truncated) for e in scored.encoded],
            },
        ),
        scored.fingerprint,
    )


@api.get("/v1/models", responses=error_responses(Dialect.WARM))
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
        head_dtype=info.head_dtype,
        device=info.device,
        backend=info.backend,
        compiled=info.compiled,
        max_length=info.max_length,
        chat_template=model.encoder.chat_template,
        scale=scale_of(model.calibration, s.normalize),
        self_check=None if state.self_check is None else SelfCheckCard(**asdict(state.self_check)),
        limits=Limits(
            max_items_per_request=s.max_items_per_request,
            max_chars_per_item=s.max_chars_per_item,
            max_tokens_per_item=info.max_length,
            max_body_bytes=s.max_body_bytes,
            max_batch_size=model.batch_size,
            max_batch_tokens=model.batch_tokens,
        ),
    )
    return ModelList(data=[card])


@probes.get("/health")
async def health() -> Status:
    """Alive: the process answers (the model may still be loading)."""
    return Status(status="ok")


@probes.get("/ready", responses={503: {"model": WarmError, "description": "not_ready"}})
async def ready(request: Request) -> Status:
    """Ready: model loaded, warm-up done, not draining; else 503."""
    state = state_of(request)
    if state.draining:
        raise ServiceError(ErrorType.NOT_READY, "draining: the service is shutting down")
    state.serving()
    return Status(status="ready")


@probes.get(
    "/metrics",
    dependencies=[Depends(authorize_metrics)],
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition",
        },
        401: {"model": WarmError, "description": "unauthorized (with protect_metrics)"},
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus exposition of the `warm_` metrics."""
    data = generate_latest(state_of(request).metrics.registry)
    return Response(content=data, media_type=CONTENT_TYPE_LATEST)
