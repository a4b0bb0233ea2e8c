"""The request models: what they accept and what they refuse."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from service.protocol import GetRewardRequest, Item, Message, RerankRequest, ScoreRequest

# --- protocol -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "n_chars"),
    [
        ({"text": "hello"}, 5),
        ({"prompt": "abc", "response": "de"}, 5),
        ({"prompt": "", "response": ""}, 0),
        ({"messages": [{"role": "system", "content": "ab"}, {"role": "user", "content": "c"}]}, 3),
    ],
)
def test_item_valid_forms(body: dict[str, Any], n_chars: int) -> None:
    assert Item.model_validate(body).n_chars() == n_chars


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "exactly one of"),
        ({"text": "a", "prompt": "p", "response": "r"}, "exactly one of"),
        ({"text": "a", "messages": [{"role": "user", "content": "x"}]}, "exactly one of"),
        ({"prompt": "p"}, "response is missing"),
        ({"response": "r"}, "prompt is missing"),
        ({"text": "a", "score": 1}, "Extra inputs"),
        ({"messages": []}, "at least 1"),
        ({"messages": [{"role": "", "content": "x"}]}, "at least 1 character"),
        ({"messages": [{"role": "user", "content": "x", "weight": 1}]}, "Extra inputs"),
    ],
)
def test_item_rejected(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Item.model_validate(body)


def test_score_request() -> None:
    with pytest.raises(ValidationError, match="at least 1"):
        ScoreRequest.model_validate({"items": []})
    with pytest.raises(ValidationError, match="truncation_side"):
        ScoreRequest.model_validate({"items": [{"text": "a"}], "truncation_side": "middle"})
    request = ScoreRequest.model_validate({"items": [{"text": "a"}], "truncation_side": "right"})
    assert request.truncation_side == "right" and request.items[0].text == "a"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"candidates": ["a"]}, "exactly one of prompt, messages or query"),
        (
            {"prompt": "p", "messages": [{"role": "user", "content": "p"}], "candidates": ["a"]},
            "exactly one of prompt, messages or query",
        ),
        ({"query": "q", "prompt": "p", "documents": ["a"]}, "exactly one of prompt, messages"),
        ({"prompt": "p"}, "exactly one of candidates or documents"),
        ({"query": "q", "candidates": ["a"], "documents": ["b"]}, "exactly one of candidates"),
        ({"query": "q", "documents": ["a"], "top_k": 1, "top_n": 1}, "at most one of top_k"),
        ({"query": "q", "documents": [{"title": "t"}]}, "text"),
        ({"query": "q", "documents": ["a"], "top_n": -1}, "greater than or equal to 0"),
        ({"prompt": "p", "candidates": []}, "at least 1"),
        ({"prompt": "p", "candidates": ["a"], "top_k": 0}, "greater than or equal to 1"),
        ({"prompt": "p", "candidates": ["a"], "extra": True}, "Extra inputs"),
    ],
)
def test_rerank_request_rejected(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RerankRequest.model_validate(body)


def test_rerank_request_items() -> None:
    by_prompt = RerankRequest(prompt="Q", candidates=["a", "b"], top_k=1)
    assert by_prompt.items() == [Item(prompt="Q", response="a"), Item(prompt="Q", response="b")]
    chat = [Message(role="system", content="S"), Message(role="user", content="Q")]
    by_chat = RerankRequest(messages=chat, candidates=["a", "b"])
    items = by_chat.items()
    assert [[(m.role, m.content) for m in item.messages or []] for item in items] == [
        [("system", "S"), ("user", "Q"), ("assistant", "a")],
        [("system", "S"), ("user", "Q"), ("assistant", "b")],
    ]
    assert len(by_chat.messages or []) == 2  # the request's own chat is not mutated


def test_get_reward_request_allows_extra() -> None:
    request = GetRewardRequest.model_validate({"query": ["q"], "labels": [1], "custom": "x"})
    assert request.query == ["q"] and request.labels == [1]
    assert request.model_extra == {"custom": "x"}
    with pytest.raises(ValidationError):
        GetRewardRequest.model_validate({"query": []})
