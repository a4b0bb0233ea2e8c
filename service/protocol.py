"""Request and response bodies of the HTTP API: validated here, at the boundary.

Clients (rl_client, tests) parse responses back into these same models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Scored responses carry the served model's fingerprint in this header (clients pin to it).
FINGERPRINT_HEADER = "x-warm-fingerprint"

Side = Literal["left", "right"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Strict):
    """One chat turn. Any role the model's chat template accepts (`system`, `user`,
    `assistant`, `tool`, ...): the template decides, and one that refuses a turn fails the
    request with a 422 naming the item."""

    role: str = Field(min_length=1)
    content: str
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(
        None, description="An assistant turn's tool calls, as OpenAI's chat format has them."
    )
    tool_call_id: str | None = None


class Item(_Strict):
    """One thing to score: exactly one of `text`, `prompt` + `response`, or `messages`."""

    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_form(self) -> Item:
        pair = self.prompt is not None or self.response is not None
        forms = [self.text is not None, pair, self.messages is not None]
        if sum(forms) != 1:
            raise ValueError("give exactly one of text, prompt + response, or messages")
        if pair and (self.prompt is None or self.response is None):
            missing = "response" if self.response is None else "prompt"
            raise ValueError(f"prompt and response go together: {missing} is missing")
        return self

    def n_chars(self) -> int:
        """Characters in the item's text fields (the per-item size limit)."""
        if self.messages is not None:
            return sum(len(m.content) for m in self.messages)
        return sum(len(s) for s in (self.text, self.prompt, self.response) if s is not None)


class ScoreRequest(_Strict):
    """POST /v1/score."""

    items: list[Item] = Field(min_length=1)
    truncation_side: Side | None = Field(
        None, description="Which end of an over-long item to cut (default: the server's)."
    )


class Usage(BaseModel):
    """What a request cost."""

    items: int
    tokens: int = Field(description="Tokens scored, after truncation.")
    truncated_items: int


class ScoreResult(BaseModel):
    """The reward of one item; `index` is its position in the request."""

    index: int
    reward: float = Field(description="The raw logit (no activation) of the reward head.")
    rewards: list[float] | None = Field(
        None, description="Every output, for models with several (multi-head RMs)."
    )
    n_tokens: int
    truncated: bool


class ScoreResponse(BaseModel):
    """Response of POST /v1/score: results in request order."""

    model: str
    results: list[ScoreResult]
    usage: Usage


class RerankRequest(_Strict):
    """POST /v1/rerank: N candidate responses to one prompt."""

    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    candidates: list[str] = Field(min_length=1)
    top_k: int | None = Field(None, ge=1, description="Return only the k best (default: all).")
    truncation_side: Side | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> RerankRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self

    def items(self) -> list[Item]:
        """Each candidate as a scoreable item: the prompt (or chat) plus its response."""
        if self.prompt is not None:
            return [Item(prompt=self.prompt, response=c) for c in self.candidates]
        assert self.messages is not None
        return [
            Item(messages=[*self.messages, Message(role="assistant", content=c)])
            for c in self.candidates
        ]


class RerankResult(BaseModel):
    """One candidate, ranked: `index` is its position in the request, `rank` 0 is the best."""

    index: int
    rank: int
    reward: float
    advantage: float = Field(description="(reward - group mean) / group std; 0 if std is 0.")
    rewards: list[float] | None = None
    n_tokens: int
    truncated: bool


class RerankResponse(BaseModel):
    """Response of POST /v1/rerank: candidates best first."""

    model: str
    results: list[RerankResult]
    best_index: int
    mean: float
    std: float = Field(description="Sample standard deviation (n - 1) of the group's rewards.")
    usage: Usage


class Limits(BaseModel):
    """What one request may contain; clients chunk their batches to fit."""

    max_items_per_request: int
    max_chars_per_item: int
    max_tokens_per_item: int
    max_body_bytes: int
    max_batch_size: int
    max_batch_tokens: int


class ModelCard(BaseModel):
    """GET /v1/models entry: what is served, and where it came from."""

    id: str
    object: Literal["model"] = "model"
    fingerprint: str = Field(
        description="The WARM artifact's fingerprint, or SHA-256 over the weight files."
    )
    manifest: dict[str, Any] | None = Field(
        None, description="The merge record of a WARM artifact (None for a plain model)."
    )
    architecture: str
    num_labels: int
    dtype: str
    device: str
    backend: str
    compiled: bool = Field(
        False, description="The transformers backend runs the model through torch.compile."
    )
    max_length: int
    chat_template: bool
    limits: Limits


class ModelList(BaseModel):
    """Response of GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward-model request: `query` holds full prompt+response texts."""

    model_config = ConfigDict(extra="allow")

    query: list[str] = Field(min_length=1)
    prompts: list[str] | None = None
    labels: list[Any] | None = None


class GetRewardResponse(BaseModel):
    """OpenRLHF's remote reward-model response."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


class Status(BaseModel):
    """Response of /health and /ready."""

    status: str
