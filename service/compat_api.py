"""Routes that answer other servers' clients unchanged: vLLM's pooling API and TEI's /predict.

Each route validates its anchor's request shape, scores through the same path as /v1/score
(same rendering, tokens, batches and rewards) and answers in its anchor's response shape and
error envelope (`errors.Dialect`).
"""

from __future__ import annotations

import json
import os

from fastapi import APIRouter, Depends, Request, Response
from pydantic import RootModel

from service.api import authorize, json_response, state_of
from service.compat import (
    ClassificationData,
    ClassificationResponse,
    EmbeddingData,
    EmbeddingResponse,
    PoolingData,
    PoolingRequest,
    PoolingResponse,
    Prediction,
    PredictRequest,
    UsageInfo,
    activated,
    predictions,
    request_id,
)
from service.errors import EMPTY_INPUT, Dialect, ErrorType, ServiceError
from service.openapi import error_responses
from service.protocol import Item
from service.state import Scored, ServiceState

compat = APIRouter(dependencies=[Depends(authorize)])

DIALECTS: dict[str, Dialect] = {
    "/classify": Dialect.VLLM,
    "/pooling": Dialect.VLLM,
    "/v1/embeddings": Dialect.VLLM,
    "/predict": Dialect.TEI,
}


async def pool(request: Request, body: PoolingRequest) -> tuple[Scored, str]:
    """Score a vLLM pooling request's inputs; also the name responses report."""
    state = state_of(request)
    model = state.serving()
    names = model.names(state.settings.served_model_name, state.settings.model)
    if body.model and not accepts(names, body.model):
        raise ServiceError(ErrorType.NOT_FOUND, f"The model `{body.model}` does not exist.")
    limit = max_tokens(state, body.truncate_prompt_tokens)
    side = body.truncation_side
    given = body.input
    if isinstance(given, list) and not given:
        raise ServiceError(ErrorType.INVALID_REQUEST, "You must pass at least one prompt")
    if body.messages is not None:
        special = bool(body.add_special_tokens)  # vLLM's chat default: the template's tokens
        items = [Item(messages=body.messages)]
        scored = await state.score(request, items, side, max_length=limit, special_tokens=special)
    elif isinstance(given, str) or (isinstance(given, list) and isinstance(given[0], str)):
        texts = [given] if isinstance(given, str) else [t for t in given if isinstance(t, str)]
        special = body.add_special_tokens is not False
        items = [Item(text=t) for t in texts]
        scored = await state.score(request, items, side, max_length=limit, special_tokens=special)
    else:
        assert isinstance(given, list)
        flat = [t for t in given if isinstance(t, int)]
        sequences = (
            [flat] if flat else [[int(t) for t in row] for row in given if isinstance(row, list)]
        )
        scored = await state.score_ids(request, sequences, side, max_length=limit)
    return scored, names[0]


def accepts(names: tuple[str, ...], name: str) -> bool:
    """Whether a request's `model` names the served model: one of `names`, or the same path
    written another way (a trailing slash, a leading ./)."""
    return name in names or os.path.normpath(name) in {os.path.normpath(n) for n in names}


def response_id(request: Request, prefix: str, body: PoolingRequest) -> str:
    """vLLM's id: the X-Request-Id header, else the body's request_id, else random."""
    return request_id(prefix, request.headers.get("x-request-id") or body.request_id)


def max_tokens(state: ServiceState, truncate: int | None) -> int | None:
    """vLLM's truncate_prompt_tokens as a per-request cut (-1 or None: the model's limit)."""
    limit = state.serving().encoder.max_length
    if truncate is None or truncate == -1:
        return None
    if truncate > limit:
        raise ServiceError(
            ErrorType.INVALID_REQUEST,
            "truncate_prompt_tokens value is greater than max_model_len. Please request a "
            "smaller truncation size.",
            param="truncate_prompt_tokens",
        )
    return truncate


def usage_of(scored: Scored) -> UsageInfo:
    """vLLM's usage block: every scored token is a prompt token."""
    tokens = sum(len(e.ids) for e in scored.encoded)
    return UsageInfo(prompt_tokens=tokens, total_tokens=tokens)


def head_values(state: ServiceState, scored: Scored, activation: bool) -> list[list[float]]:
    """Each item's outputs, through the head's activation when asked (never for regression)."""
    problem_type = state.serving().problem_type
    rows = [[float(x) for x in row] for row in scored.outputs]
    if not activation:
        return rows
    return [activated(row, problem_type) for row in rows]


@compat.post(
    "/classify", response_model=ClassificationResponse, responses=error_responses(Dialect.VLLM)
)
async def classify(body: PoolingRequest, request: Request) -> Response:
    """vLLM's classify API (verl's reward loop): `probs` is the reward, through a sigmoid unless
    `use_activation` (or the older `activation`) is false."""
    scored, name = await pool(request, body)
    state = state_of(request)
    labels = state.serving().labels
    data = []
    for index, probs in enumerate(head_values(state, scored, body.wants_activation())):
        best = max(range(len(probs)), key=probs.__getitem__)
        data.append(
            ClassificationData(index=index, label=labels[best], probs=probs, num_classes=len(probs))
        )
    response = ClassificationResponse(
        id=response_id(request, "classify", body), model=name, data=data, usage=usage_of(scored)
    )
    return json_response(response, scored.fingerprint)


@compat.post("/pooling", response_model=PoolingResponse, responses=error_responses(Dialect.VLLM))
async def pooling(body: PoolingRequest, request: Request) -> Response:
    """vLLM's pooling API with `task: "classify"`: `data[].data` as /classify's `probs`."""
    if body.task not in (None, "classify"):
        raise ServiceError(
            ErrorType.INVALID_REQUEST,
            f"task {body.task!r}: a reward model serves the 'classify' task only",
            param="task",
        )
    scored, name = await pool(request, body)
    values = head_values(state_of(request), scored, body.wants_activation())
    data = [PoolingData(index=i, data=v) for i, v in enumerate(values)]
    response = PoolingResponse(
        id=response_id(request, "pooling", body), model=name, data=data, usage=usage_of(scored)
    )
    return json_response(response, scored.fingerprint)


@compat.post(
    "/v1/embeddings", response_model=EmbeddingResponse, responses=error_responses(Dialect.VLLM)
)
async def embeddings(body: PoolingRequest, request: Request) -> Response:
    """SGLang's reward-model embeddings (verl's SGLang path): `embedding` is the raw head
    output, the reward last."""
    scored, name = await pool(request, body)
    values = head_values(state_of(request), scored, activation=False)
    data = [EmbeddingData(index=i, embedding=v) for i, v in enumerate(values)]
    response = EmbeddingResponse(
        id=response_id(request, "embd", body), model=name, data=data, usage=usage_of(scored)
    )
    return json_response(response, scored.fingerprint)


PredictResponse = RootModel[list[Prediction] | list[list[Prediction]]]


@compat.post("/predict", response_model=PredictResponse, responses=error_responses(Dialect.TEI))
async def predict(body: PredictRequest, request: Request) -> Response:
    """TEI's predict API: a text or [prompt, response] pair (or a batch of them) -> scores per
    label, best first; a sigmoid of the reward unless `raw_scores`."""
    state = state_of(request)
    inputs, batched = body.batch()
    if not inputs:
        raise ServiceError(
            ErrorType.INVALID_REQUEST,
            "Input validation error: `inputs` cannot be empty",
            detail=EMPTY_INPUT,
        )
    items = [Item(text=x[0]) if len(x) == 1 else Item(prompt=x[0], response=x[1]) for x in inputs]
    side = body.truncation_direction.lower()
    scored = await state.score(request, items, side, truncate=body.truncate is not False)
    model = state.serving()
    answers = [
        [
            p.model_dump()
            for p in predictions(row, model.labels, body.raw_scores, model.problem_type)
        ]
        for row in scored.outputs
    ]
    content = json.dumps(answers if batched else answers[0], separators=(",", ":"))
    return Response(content=content, media_type="application/json")
