"""The service's closed set of errors and the one table mapping them to HTTP statuses.

Every error leaves the service as `{"error": {"type": ..., "message": ...}}`.
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

    def __init__(self, type: ErrorType, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.retry_after = retry_after

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
    """The JSON body of every error response."""
    return {"error": {"type": type.value, "message": message}}


def invalid_request(errors: Sequence[Mapping[str, Any]]) -> ServiceError:
    """A request body's validation errors (pydantic's `errors()`) as one 422 naming each."""
    problems = []
    for err in errors:
        where = "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in err["loc"][1:]
        ).lstrip(".")
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "json_invalid":
            where, message = "body", f"invalid JSON ({err.get('ctx', {}).get('error', message)})"
        problems.append(f"{where or 'body'}: {message}")
    return ServiceError(ErrorType.INVALID_REQUEST, "; ".join(problems))
