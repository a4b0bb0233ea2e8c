"""The app factory: routes, error envelope, middleware and the model's lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from service import __version__
from service.api import api, probes
from service.compat_api import DIALECTS, compat
from service.errors import (
    TYPE_OF_STATUS,
    Dialect,
    ErrorType,
    ServiceError,
    invalid_request,
    rendered,
    route_path,
)
from service.loader import LoadedModel
from service.metrics import Metrics
from service.middleware import BodyLimit, RequestMetrics
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger(__name__)


def create_app(settings: Settings, model: LoadedModel | None = None) -> FastAPI:
    """A reward service for `settings`; the model loads in the background (or is given)."""
    metrics = Metrics()
    state = ServiceState(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(state.load(model))
        try:
            yield
        finally:
            await loading
            await state.close()

    # /docs and /redoc load their assets from the service itself, never from a CDN.
    app = FastAPIOffline(
        title="warm-rm",
        version=__version__,
        summary="Reward-model scoring and best-of-N reranking for RLHF.",
        lifespan=lifespan,
    )
    app.state.warm = state
    app.include_router(api)
    app.include_router(compat)
    app.include_router(probes)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.openapi = partial(openapi_schema, app)  # type: ignore[method-assign]
    endpoints = frozenset(r.path for r in app.routes if hasattr(r, "path"))
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, metrics=metrics, dialects=DIALECTS
    )
    app.add_middleware(RequestMetrics, metrics=metrics, endpoints=endpoints)
    return app


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, less the default 422 it adds to routes whose dialect never sends one
    (vLLM answers bad bodies with a 400)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        for path, dialect in DIALECTS.items():
            if dialect is Dialect.VLLM:
                schema["paths"][path]["post"]["responses"].pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema


def _respond(request: Request, error: ServiceError) -> JSONResponse:
    """The error in the envelope of the API the route speaks."""
    request.app.state.warm.metrics.errors.labels(error.type.value).inc()
    status, body = rendered(DIALECTS.get(route_path(request.scope), Dialect.WARM), error)
    return JSONResponse(body, status_code=status, headers=error.headers())


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return _respond(request, exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _respond(request, invalid_request(exc.errors()))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    kind = TYPE_OF_STATUS.get(exc.status_code, ErrorType.INTERNAL)
    error = ServiceError(kind, str(exc.detail))
    response = _respond(request, error)
    response.status_code = exc.status_code
    response.headers.update(exc.headers or {})  # e.g. Allow on a 405
    return response


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s", request.url.path, exc_info=exc)
    return _respond(request, ServiceError(ErrorType.INTERNAL, "internal error (see server log)"))
