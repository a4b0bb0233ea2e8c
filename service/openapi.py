"""The error responses each route documents in the OpenAPI schema, by error dialect.

Generated clients read the schema as the contract: every status a route can answer with is
listed with the JSON body it carries (`errors.rendered` writes those bodies).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.errors import STATUS, TEI_ERRORS, VLLM_ERRORS, Dialect, ErrorType


class WarmErrorBody(BaseModel):
    """What went wrong."""

    type: str = Field(description="One of the service's error types, e.g. 'overloaded'.")
    message: str


class WarmError(BaseModel):
    """The error envelope of warm-rm's own routes."""

    error: WarmErrorBody


class VLLMErrorBody(BaseModel):
    """vLLM's error details."""

    message: str
    type: str
    param: str | None
    code: int


class VLLMError(BaseModel):
    """vLLM's error envelope (vLLM's pooling routes)."""

    error: VLLMErrorBody


class TEIError(BaseModel):
    """TEI's error envelope (/predict)."""

    error: str
    error_type: str


# The errors a scoring route can meet, whatever its dialect (499 is never read by anyone).
SCORING_ERRORS = (
    ErrorType.INVALID_REQUEST,
    ErrorType.UNAUTHORIZED,
    ErrorType.PAYLOAD_TOO_LARGE,
    ErrorType.OVERLOADED,
    ErrorType.NOT_READY,
    ErrorType.DEADLINE_EXCEEDED,
    ErrorType.BACKEND_ERROR,
    ErrorType.INTERNAL,
)
ENVELOPES: dict[Dialect, type[BaseModel]] = {
    Dialect.WARM: WarmError,
    Dialect.VLLM: VLLMError,
    Dialect.TEI: TEIError,
}


def statuses(dialect: Dialect) -> dict[int, list[ErrorType]]:
    """Every status a scoring route of `dialect` answers with, and the errors behind it."""
    extra = {
        Dialect.WARM: (),
        Dialect.VLLM: (ErrorType.NOT_FOUND,),  # an unknown `model` name
        Dialect.TEI: (),
    }[dialect]
    out: dict[int, list[ErrorType]] = {}
    for kind in (*SCORING_ERRORS, *extra):
        status = {
            Dialect.WARM: STATUS[kind],
            Dialect.VLLM: VLLM_ERRORS[kind][0],
            Dialect.TEI: TEI_ERRORS[kind][0],
        }[dialect]
        out.setdefault(status, []).append(kind)
    if dialect is Dialect.WARM:
        out.setdefault(400, []).append(ErrorType.INVALID_REQUEST)  # a malformed HTTP request
    if dialect is Dialect.TEI:
        out.setdefault(400, []).append(ErrorType.INVALID_REQUEST)  # TEI's "Empty"
    return dict(sorted(out.items()))


def error_responses(dialect: Dialect) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for a scoring route of `dialect`."""
    model = ENVELOPES[dialect]
    return {
        status: {
            "model": model,
            "description": ", ".join(sorted({k.value for k in kinds})),
        }
        for status, kinds in statuses(dialect).items()
    }
