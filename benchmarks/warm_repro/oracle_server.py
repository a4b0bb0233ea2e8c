"""The true reward as an HTTP endpoint: `prefdata.oracle` behind the warm-serve protocol.

What. `create_oracle_app` answers `POST /v1/score` with `prefdata.oracle(prompt, response)`
per item, plus the `GET /v1/models`, `/health` and `/ready` that `rl_client.RewardClient`
and probes expect; requests and responses are the service's own pydantic models
(`service.protocol`) and errors its JSON envelope (`service.errors`). Run it next to a
benchmark with `service.loopback.serve`.

Why. The RL experiment optimises a policy against a reward model and logs the oracle as
`warm-rl train --control-url`: the gap between the two is the reward hacking that WARM
should reduce. Serving the oracle with the same protocol lets the unchanged trainer and
client use it (even as the optimised reward, for an upper-bound run). `RewardClient` reads
`/v1/models` before its first score, for the limits it chunks batches by, so the oracle
publishes a model card; it never calls `/ready`, which `serve` waits for at start-up.

The oracle judges a response to a prompt, so `text` and `messages` items are refused with a
422 `invalid_request`. The app deliberately does not import `service.api`/`service.app`:
those pull in the model loader (torch, transformers), which a text-only oracle does not need.

Run it alone: `python benchmarks/warm_repro/oracle_server.py --port 8001`.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from merger.recipe import prefdata
from service.errors import TYPE_OF_STATUS, ErrorType, ServiceError, envelope, invalid_request
from service.protocol import (
    FINGERPRINT_HEADER,
    Item,
    Limits,
    ModelCard,
    ModelList,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
    Status,
    Usage,
)
from service.settings import Settings

# The oracle reads any length; advertise a default warm-serve's request limits.
MAX_CHARS = int(Settings.model_fields["max_chars_per_item"].default)


def fingerprint() -> str:
    """SHA-256 of prefdata's source: the oracle changes only when that file does."""
    return hashlib.sha256(Path(prefdata.__file__).read_bytes()).hexdigest()


def model_card(model_id: str) -> ModelCard:
    """The oracle as `/v1/models` describes a served model, with a default server's limits."""
    defaults = Settings.model_fields
    return ModelCard(
        id=model_id,
        fingerprint=fingerprint(),
        manifest=None,
        architecture="prefdata.oracle",
        num_labels=1,
        dtype="none",
        device="cpu",
        backend="oracle",
        max_length=MAX_CHARS,  # a prefdata token is at least one character
        chat_template=False,
        limits=Limits(
            max_items_per_request=int(defaults["max_items_per_request"].default),
            max_chars_per_item=MAX_CHARS,
            max_tokens_per_item=MAX_CHARS,
            max_body_bytes=int(defaults["max_body_bytes"].default),
            max_batch_size=int(defaults["max_batch_size"].default),
            max_batch_tokens=int(defaults["max_batch_tokens"].default),
        ),
    )


def score_item(index: int, item: Item) -> ScoreResult:
    """The oracle's reward of one prompt + response item; `n_tokens` counts what it read."""
    if item.prompt is None or item.response is None:
        form = "text" if item.text is not None else "messages"
        raise ServiceError(
            ErrorType.INVALID_REQUEST,
            f"items[{index}]: the oracle scores prompt + response items, not {form}",
        )
    n_tokens = len(prefdata.tokenize(item.prompt)) + len(prefdata.tokenize(item.response))
    reward = prefdata.oracle(item.prompt, item.response)
    return ScoreResult(index=index, reward=reward, n_tokens=n_tokens, truncated=False)


def json_response(body: BaseModel, fingerprint: str) -> Response:
    """A response model as JSON, with the fingerprint header pinned clients check."""
    return Response(
        content=body.model_dump_json(),
        media_type="application/json",
        headers={FINGERPRINT_HEADER: fingerprint},
    )


def error_response(error: ServiceError, status: int | None = None) -> JSONResponse:
    """The service's error envelope for `error`."""
    return JSONResponse(
        envelope(error.type, error.message),
        status_code=status or error.status,
        headers=error.headers(),
    )


async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
    """A `ServiceError` raised by a route."""
    assert isinstance(exc, ServiceError)
    return error_response(exc)


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """A request body that does not parse: 422 naming each problem, as warm-serve does."""
    assert isinstance(exc, RequestValidationError)
    return error_response(invalid_request(exc.errors()))


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Framework errors (unknown route, wrong method) in the same envelope."""
    assert isinstance(exc, HTTPException)
    kind = TYPE_OF_STATUS.get(exc.status_code, ErrorType.INTERNAL)
    response = error_response(ServiceError(kind, str(exc.detail)), exc.status_code)
    response.headers.update(exc.headers or {})
    return response


def create_oracle_app(model_id: str = "oracle") -> FastAPI:
    """A FastAPI app that scores prompt + response items with `prefdata.oracle`."""
    app = FastAPI(title="warm-repro oracle", summary="prefdata.oracle as a reward endpoint.")
    card = model_card(model_id)

    @app.post("/v1/score", response_model=ScoreResponse)
    async def score(body: ScoreRequest) -> Response:
        results = [score_item(i, item) for i, item in enumerate(body.items)]
        usage = Usage(
            items=len(results), tokens=sum(r.n_tokens for r in results), truncated_items=0
        )
        return json_response(
            ScoreResponse(model=model_id, results=results, usage=usage), card.fingerprint
        )

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[card])

    @app.get("/health")
    async def health() -> Status:
        return Status(status="ok")

    @app.get("/ready")
    async def ready() -> Status:
        return Status(status="ready")

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    return app


def main(argv: list[str] | None = None) -> None:
    """Serve the oracle until interrupted."""
    parser = argparse.ArgumentParser(description="Serve prefdata.oracle as a reward endpoint.")
    parser.add_argument("--host", default="127.0.0.1", help="Interface to listen on.")
    parser.add_argument("--port", type=int, default=8001, help="Port to listen on.")
    parser.add_argument("--model-id", default="oracle", help="Name reported for the model.")
    args = parser.parse_args(argv)
    uvicorn.run(create_oracle_app(args.model_id), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
