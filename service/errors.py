"""The service's closed set of errors and the tables mapping them to HTTP statuses and bodies.

An error leaves the service in the envelope of the API its route speaks (`Dialect`):
- warm-rm's own routes: `{"error": {"type": ..., "message": ...}}`;
- vLLM's pooling routes (`/classify`, `/pooling`, `/v1/embeddings`), as vLLM sends it:
  `{"error": {"message", "type", "param", "code"}}`, every bad request a 400;
- TEI's `/predict`, as text-embeddings-inference sends it: `{"error", "error_type"}`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any


class ErrorType(str, Enum):
    """What went wrong, as clients see it in `error.type`."""

    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    OVERLOADED = "overloaded"
    NOT_READY = "not_ready"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CLIENT_CLOSED = "client_closed"
    BACKEND_ERROR = "backend_error"
    INTERNAL = "internal_error"


STATUS: dict[ErrorType, int] = {
    ErrorType.INVALID_REQUEST: 422,
    ErrorType.UNAUTHORIZED: 401,
    ErrorType.NOT_FOUND: 404,
    ErrorType.METHOD_NOT_ALLOWED: 405,
    ErrorType.PAYLOAD_TOO_LARGE: 413,
    ErrorType.OVERLOADED: 429,
    ErrorType.NOT_READY: 503,
    ErrorType.DEADLINE_EXCEEDED: 504,
    ErrorType.CLIENT_CLOSED: 499,  # nginx's convention; nobody is left to read it
    ErrorType.BACKEND_ERROR: 500,
    ErrorType.INTERNAL: 500,
}

# Statuses the framework raises on its own (unknown route, wrong method, ...).
TYPE_OF_STATUS: dict[int, ErrorType] = {
    400: ErrorType.INVALID_REQUEST,
    401: ErrorType.UNAUTHORIZED,
    404: ErrorType.NOT_FOUND,
    405: ErrorType.METHOD_NOT_ALLOWED,
    413: ErrorType.PAYLOAD_TOO_LARGE,
    422: ErrorType.INVALID_REQUEST,
}


class ServiceError(Exception):
    """An error with a type, a message for the client and, for 429/503, a retry hint."""

    def __init__(
        self,
        type: ErrorType,
        message: str,
        *,
        retry_after: float | None = None,
        param: str | None = None,
        detail: str | None = None,
    ) -> None:
        """`param`: the request field at fault (vLLM's envelope names it); `detail`: a finer
        kind some envelopes tell apart (`EMPTY_INPUT`)."""
        super().__init__(message)
        self.type = type
        self.message = message
        self.retry_after = retry_after
        self.param = param
        self.detail = detail

    @property
    def status(self) -> int:
        """The HTTP status of this error."""
        return STATUS[self.type]

    def headers(self) -> dict[str, str]:
        """Response headers that go with the error."""
        headers: dict[str, str] = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        if self.type is ErrorType.UNAUTHORIZED:
            headers["WWW-Authenticate"] = "Bearer"
        return headers


def envelope(type: ErrorType, message: str) -> dict[str, Any]:
    """The JSON body of an error on warm-rm's own routes."""
    return {"error": {"type": type.value, "message": message}}


class Dialect(str, Enum):
    """Whose error envelope and statuses a route answers with."""

    WARM = "warm"
    VLLM = "vllm"
    TEI = "tei"


# vLLM answers every client mistake with a 400 (its validation errors included).
VLLM_ERRORS: dict[ErrorType, tuple[int, str]] = {
    ErrorType.INVALID_REQUEST: (400, "BadRequestError"),
    ErrorType.UNAUTHORIZED: (401, "Unauthorized"),
    ErrorType.NOT_FOUND: (404, "NotFoundError"),
    ErrorType.METHOD_NOT_ALLOWED: (405, "MethodNotAllowed"),
    ErrorType.PAYLOAD_TOO_LARGE: (413, "PayloadTooLarge"),
    ErrorType.OVERLOADED: (429, "TooManyRequests"),
    ErrorType.NOT_READY: (503, "ServiceUnavailableError"),
    ErrorType.DEADLINE_EXCEEDED: (504, "GatewayTimeout"),
    ErrorType.CLIENT_CLOSED: (499, "ClientClosed"),
    ErrorType.BACKEND_ERROR: (500, "InternalServerError"),
    ErrorType.INTERNAL: (500, "InternalServerError"),
}
# TEI's error types and statuses (v1.9: Validation 422, Backend 424, Overloaded 429, ...).
TEI_ERRORS: dict[ErrorType, tuple[int, str]] = {
    ErrorType.INVALID_REQUEST: (422, "Validation"),
    ErrorType.UNAUTHORIZED: (401, "Unauthorized"),
    ErrorType.NOT_FOUND: (404, "NotFound"),
    ErrorType.METHOD_NOT_ALLOWED: (405, "MethodNotAllowed"),
    ErrorType.PAYLOAD_TOO_LARGE: (413, "Validation"),
    ErrorType.OVERLOADED: (429, "Overloaded"),
    ErrorType.NOT_READY: (503, "Unhealthy"),
    ErrorType.DEADLINE_EXCEEDED: (504, "Backend"),
    ErrorType.CLIENT_CLOSED: (499, "Backend"),
    ErrorType.BACKEND_ERROR: (424, "Backend"),
    ErrorType.INTERNAL: (500, "Backend"),
}
EMPTY_INPUT = "empty"  # ServiceError.detail of an empty batch: TEI's 400 "Empty"
VALIDATION = "validation"  # ServiceError.detail of a body that failed validation


def rendered(dialect: Dialect, error: ServiceError) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of `error` on a route of `dialect`."""
    if dialect is Dialect.VLLM:
        status, kind = VLLM_ERRORS[error.type]
        if error.detail == VALIDATION:
            kind = "Bad Request"  # vLLM's type for a body that fails validation
        body = {"message": error.message, "type": kind, "param": error.param, "code": status}
        return status, {"error": body}
    if dialect is Dialect.TEI:
        status, kind = TEI_ERRORS[error.type]
        if error.detail == EMPTY_INPUT:
            status, kind = 400, "Empty"
        return status, {"error": error.message, "error_type": kind}
    return error.status, envelope(error.type, error.message)


def invalid_request(errors: Sequence[Mapping[str, Any]]) -> ServiceError:
    """A request body's validation errors (pydantic's `errors()`) as one 422 naming each."""
    problems = []
    first = errors[0]["loc"] if errors else ()
    # The field's path, without pydantic's union-member tags ("list[int]", ...).
    fields = [str(p) for p in first if isinstance(p, int) or str(p).isidentifier()]
    param = ".".join(fields) or None
    for err in errors:
        where = "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in err["loc"][1:]
        ).lstrip(".")
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "json_invalid":
            where, message = "body", f"invalid JSON ({err.get('ctx', {}).get('error', message)})"
        problems.append(f"{where or 'body'}: {message}")
    return ServiceError(
        ErrorType.INVALID_REQUEST, "; ".join(problems), param=param, detail=VALIDATION
    )


def route_path(scope: Mapping[str, Any]) -> str:
    """The request's path within the app (without a proxy's root_path)."""
    path, root = str(scope["path"]), str(scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root) else path
