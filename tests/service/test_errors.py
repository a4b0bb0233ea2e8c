"""Every error leaves as one JSON envelope with the right status; bad input loses nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live import Live, live_server
from pydantic import BaseModel

from service.errors import STATUS, ErrorType, ServiceError, envelope
from service.settings import Settings


class ErrorBody(BaseModel):
    """The error envelope's inner object."""

    type: str
    message: str


class ErrorEnvelope(BaseModel):
    """{"error": {"type", "message"}}."""

    error: ErrorBody


def error_of(response: httpx.Response) -> ErrorBody:
    """Parse the envelope; fail if the body is anything else."""
    return ErrorEnvelope.model_validate(response.json()).error


@pytest.fixture(scope="module")
def live(gpt2_rm: Path) -> Iterator[Live]:
    """A server with small limits, so that limits are cheap to hit."""
    settings = Settings.model_validate(
        {
            "model": gpt2_rm,
            "max_items_per_request": 4,
            "max_chars_per_item": 50,
            "max_body_bytes": 2048,
        }
    )
    with live_server(settings) as server:
        yield server


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"items": [{"text": "a", "prompt": "b"}]}, "items[0]: give exactly one"),
        ({"items": [{"prompt": "a"}]}, "items[0]: prompt and response go together: response"),
        ({"items": [{}]}, "items[0]: give exactly one"),
        ({"items": []}, "items: List should have at least 1 item"),
        ({"items": [{"text": 3}]}, "items[0].text: Input should be a valid string"),
        ({"items": [{"text": "a", "extra": 1}]}, "items[0].extra: Extra inputs"),
        ({"items": [{"messages": [{"role": "", "content": "a"}]}]}, "items[0].messages[0].role"),
        ({"items": [{"messages": []}]}, "items[0].messages: List should have at least 1"),
        ({"items": [{"text": "a"}], "truncation_side": "middle"}, "truncation_side"),
        ({}, "items: Field required"),
        ({"items": [{"text": "a"}] * 5}, "5 items, more than max_items_per_request (4)"),
        ({"items": [{"text": "a"}, {"text": "x" * 51}]}, "items[1]: 51 characters"),
        ({"items": [{"prompt": "x" * 30, "response": "y" * 21}]}, "items[0]: 51 characters"),
    ],
)
def test_invalid_score_requests_get_422_naming_the_field(
    live: Live, body: dict[str, Any], where: str
) -> None:
    with live.client() as client:
        response = client.post("/v1/score", json=body)
    assert response.status_code == 422
    error = error_of(response)
    assert error.type == "invalid_request"
    assert where in error.message


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"candidates": ["a"]}, "give exactly one of prompt, messages or query"),
        ({"prompt": "p", "messages": [{"role": "user", "content": "a"}], "candidates": ["a"]},
         "give exactly one of prompt, messages or query"),
        ({"prompt": "p", "candidates": []}, "candidates: List should have at least 1"),
        ({"prompt": "p", "candidates": ["a"], "top_k": 0}, "top_k"),
        ({"prompt": "p", "candidates": ["a"] * 5}, "more than max_items_per_request"),
    ],
)  # fmt: skip
def test_invalid_rerank_requests_get_422(live: Live, body: dict[str, Any], where: str) -> None:
    with live.client() as client:
        response = client.post("/v1/rerank", json=body)
    assert response.status_code == 422
    assert where in error_of(response).message


def test_malformed_json_and_wrong_shapes(live: Live) -> None:
    with live.client() as client:
        bad_json = client.post(
            "/v1/score", content=b"{nope", headers={"content-type": "application/json"}
        )
        not_a_list = client.post("/get_reward", json={"query": "one string"})
    assert bad_json.status_code == 422 and "invalid JSON" in error_of(bad_json).message
    assert not_a_list.status_code == 422 and "query" in error_of(not_a_list).message


def test_unknown_route_and_wrong_method(live: Live) -> None:
    with live.client() as client:
        missing = client.get("/v2/score")
        wrong = client.get("/v1/score")
    assert missing.status_code == 404 and error_of(missing).type == "not_found"
    assert wrong.status_code == 405 and error_of(wrong).type == "method_not_allowed"
    assert wrong.headers["Allow"] == "POST"


def test_oversized_bodies_get_413_declared_or_streamed(live: Live) -> None:
    big = b'{"items": [{"text": "' + b"a" * 4000 + b'"}]}'

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 512):
            yield big[start : start + 512]

    with live.client() as client:
        declared = client.post(
            "/v1/score", content=big, headers={"content-type": "application/json"}
        )
        streamed = client.post(
            "/v1/score", content=chunks(), headers={"content-type": "application/json"}
        )
        still_fine = client.post("/v1/score", json={"items": [{"text": "a cat"}]})
    for response in (declared, streamed):
        assert response.status_code == 413
        assert error_of(response).type == "payload_too_large"
        assert "2048 bytes" in error_of(response).message
    assert still_fine.status_code == 200


def test_errors_are_counted_by_type(live: Live) -> None:
    before = live.metrics().get('warm_errors_total{type="invalid_request"}', 0)
    with live.client() as client:
        client.post("/v1/score", json={"items": []})
    after = live.metrics()['warm_errors_total{type="invalid_request"}']
    assert after == before + 1


@pytest.fixture(scope="module")
def secured(gpt2_rm: Path) -> Iterator[Live]:
    """A server that requires one of two API keys."""
    settings = Settings.model_validate({"model": gpt2_rm, "api_keys": ["k-one", "k-two"]})
    with live_server(settings) as server:
        yield server


@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong", "Bearer k-one-and-more", "k-one", "Basic k-one", "Bearer"],
)
def test_api_keys_reject_missing_or_wrong_tokens(secured: Live, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    with secured.client(headers=headers) as client:
        for response in (
            client.post("/v1/score", json={"items": [{"text": "a"}]}),
            client.get("/v1/models"),
        ):
            assert response.status_code == 401
            assert error_of(response).type == "unauthorized"
            assert response.headers["WWW-Authenticate"] == "Bearer"


def test_api_keys_accept_any_configured_key_and_leave_probes_open(secured: Live) -> None:
    for key in ("k-one", "k-two"):
        with secured.client(headers={"Authorization": f"Bearer {key}"}) as client:
            assert client.post("/v1/score", json={"items": [{"text": "a"}]}).status_code == 200
    with secured.client() as client:
        for path in ("/health", "/ready", "/metrics"):
            assert client.get(path).status_code == 200


def test_protect_metrics_puts_metrics_behind_the_keys(gpt2_rm: Path) -> None:
    settings = Settings.model_validate(
        {"model": gpt2_rm, "api_keys": ["k"], "protect_metrics": True}
    )
    with live_server(settings) as live, live.client() as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
        assert client.get("/health").status_code == 200


# --- errors ---------------------------------------------------------------------------------


def test_status_table() -> None:
    names = "INVALID_REQUEST UNAUTHORIZED NOT_FOUND METHOD_NOT_ALLOWED PAYLOAD_TOO_LARGE "
    names += "OVERLOADED NOT_READY DEADLINE_EXCEEDED BACKEND_ERROR INTERNAL CLIENT_CLOSED"
    statuses = [422, 401, 404, 405, 413, 429, 503, 504, 500, 500, 499]
    assert {ErrorType[n]: s for n, s in zip(names.split(), statuses, strict=True)} == STATUS


@pytest.mark.parametrize(
    ("retry_after", "header"),
    # ceil, at least 1: ceil(.2)=1, ceil(1.0)=1, ceil(1.01)=2, ceil(7.5)=8, max(1, ceil(0))=1.
    [(0.2, "1"), (1.0, "1"), (1.01, "2"), (7.5, "8"), (0.0, "1")],
)
def test_retry_after_header(retry_after: float, header: str) -> None:
    error = ServiceError(ErrorType.OVERLOADED, "busy", retry_after=retry_after)
    assert error.status == 429
    assert error.headers() == {"Retry-After": header}


def test_error_headers_and_envelope() -> None:
    unauthorized = ServiceError(ErrorType.UNAUTHORIZED, "no key")
    assert unauthorized.headers() == {"WWW-Authenticate": "Bearer"}
    assert unauthorized.status == 401 and str(unauthorized) == "no key"
    assert ServiceError(ErrorType.INTERNAL, "boom").headers() == {}
    assert envelope(ErrorType.NOT_READY, "loading") == {
        "error": {"type": "not_ready", "message": "loading"}
    }
