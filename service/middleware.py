"""ASGI middleware: request-body size limit (413) and per-endpoint request metrics.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would hide client
disconnects from the routes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import Dialect, ErrorType, ServiceError, rendered, route_path
from service.metrics import Metrics


class BodyLimit:
    """Refuse bodies over `max_bytes`: early from Content-Length, else while reading.

    The body is read here (bounded by the limit) and replayed to the app, so a streamed
    body that grows too large gets a 413, not a parse error. Later `receive` calls reach
    the client's connection, so routes still see a disconnect.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        metrics: Metrics,
        dialects: Mapping[str, Dialect] | None = None,
    ) -> None:
        """`dialects`: the error envelope of each path that does not speak warm-rm's own."""
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.dialects = dialects or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message | None = {"type": "http.request", "body": b"".join(chunks)}

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        self.metrics.errors.labels(ErrorType.PAYLOAD_TOO_LARGE.value).inc()
        error = ServiceError(
            ErrorType.PAYLOAD_TOO_LARGE, f"request body exceeds {self.max_bytes} bytes"
        )
        await _send_error(send, error, self.dialects.get(route_path(scope), Dialect.WARM))


class RequestMetrics:
    """Count requests by endpoint and status and time them (known routes only)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, endpoints: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in self.endpoints else "other"
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_latency.labels(endpoint).observe(time.perf_counter() - start)


async def _send_error(send: Send, error: ServiceError, dialect: Dialect = Dialect.WARM) -> None:
    status, payload = rendered(dialect, error)
    body = json.dumps(payload).encode()
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    start: dict[str, Any] = {"type": "http.response.start", "status": status}
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body})
