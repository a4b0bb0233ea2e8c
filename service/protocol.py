"""Request and response bodies of the HTTP API: validated here, at the boundary.

Clients (rl_client, tests) parse responses back into these same models.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from service.ranking import rank

# Scored responses carry the served model's fingerprint in this header (clients pin to it).
FINGERPRINT_HEADER = "x-warm-fingerprint"

Side = Literal["left", "right"]
Normalize = Literal["none", "zscore", "quantile"]
NORMALIZE_HELP = (
    "What `reward` carries: 'none' the raw logit; 'zscore' (raw - mean) / std and 'quantile' "
    "the raw reward's quantile in [0, 1], both over the reference responses of the "
    "artifact's calibration (warm-merge calibrate; refused for an uncalibrated model). "
    "Default: the server's --normalize."
)


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x), without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Strict):
    """One chat turn. Any role the model's chat template accepts (`system`, `user`,
    `assistant`, `tool`, ...): the template decides, and one that refuses a turn fails the
    request with a 422 naming the item."""

    role: str = Field(min_length=1)
    content: str | None = Field(
        None, description="The turn's text; null only for an assistant turn with tool_calls."
    )
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(
        None, description="An assistant turn's tool calls, as OpenAI's chat format has them."
    )
    tool_call_id: str | None = None
    reasoning_content: str | None = Field(
        None, description="A reasoning model's thinking, for templates that render it (Qwen3)."
    )

    @model_validator(mode="after")
    def _content(self) -> Message:
        if self.content is None and not self.tool_calls:
            raise ValueError("content may be null only beside tool_calls")
        return self

    def as_turn(self) -> dict[str, Any]:
        """The turn as chat templates read it: role, content and only the other keys it sets
        (templates test `'tool_calls' in message`)."""
        return {**self.model_dump(exclude_none=True), "content": self.content}

    def n_chars(self) -> int:
        """Characters of the turn's text fields and tool calls (the per-item size limit)."""
        calls = len(json.dumps(self.tool_calls)) if self.tool_calls else 0
        texts = (self.content, self.reasoning_content)
        return calls + sum(len(t) for t in texts if t is not None)


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
            return sum(m.n_chars() for m in self.messages)
        return sum(len(s) for s in (self.text, self.prompt, self.response) if s is not None)


class ScoreRequest(_Strict):
    """POST /v1/score."""

    items: list[Item] = Field(min_length=1)
    truncation_side: Side | None = Field(
        None, description="Which end of an over-long item to cut (default: the server's)."
    )
    normalize: Normalize | None = Field(None, description=NORMALIZE_HELP)


class Usage(BaseModel):
    """What a request cost."""

    items: int
    tokens: int = Field(description="Tokens scored, after truncation.")
    truncated_items: int

    @computed_field(description="`tokens`, under vLLM's and Jina's name.")  # type: ignore[prop-decorator]
    @property
    def prompt_tokens(self) -> int:
        return self.tokens

    @computed_field(description="`tokens`, under vLLM's and Jina's name.")  # type: ignore[prop-decorator]
    @property
    def total_tokens(self) -> int:
        return self.tokens


class ScoreResult(BaseModel):
    """The reward of one item; `index` is its position in the request."""

    index: int
    reward: float = Field(
        description="The reward head's raw logit (no activation), or its normalisation as the "
        "response's `normalize` says."
    )
    raw_reward: float | None = Field(
        None, description="The raw logit, where `reward` carries a normalisation."
    )
    rewards: list[float] | None = Field(
        None, description="Every output (raw), for models with several (multi-head RMs)."
    )
    n_tokens: int
    truncated: bool


class ScoreResponse(BaseModel):
    """Response of POST /v1/score: results in request order."""

    model: str
    normalize: Normalize = Field("none", description="What each result's `reward` carries.")
    results: list[ScoreResult]
    usage: Usage


class Document(BaseModel):
    """A rerank document as Cohere v1 and Jina take it: its `text` (other keys are kept)."""

    model_config = ConfigDict(extra="allow")

    text: str


class RerankRequest(_Strict):
    """POST /v1/rerank: N candidate responses to one prompt.

    Two shapes: warm-rm's (`prompt` or `messages`, `candidates`, `top_k`) and the
    Cohere/Jina/vLLM one (`query`, `documents`, `top_n`, `return_documents`); a document is
    scored as the response to the query.
    """

    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    candidates: list[str] | None = Field(None, min_length=1)
    top_k: int | None = Field(None, ge=1, description="Return only the k best (default: all).")
    truncation_side: Side | None = None
    query: str | None = Field(None, description="Cohere/Jina/vLLM: the prompt.")
    documents: list[str | Document] | None = Field(
        None, min_length=1, description="Cohere/Jina/vLLM: the candidate responses."
    )
    top_n: int | None = Field(
        None, ge=0, description="Cohere/Jina/vLLM: return only the n best (0 or unset: all)."
    )
    return_documents: bool | None = Field(
        None,
        description="Echo each document in its result (default: yes for `documents`, as "
        "Jina and vLLM do; no for `candidates`).",
    )
    use_activation: bool | None = Field(
        None, description="false: `relevance_score` is the raw reward (default: its sigmoid)."
    )
    # Sent by Cohere, Jina and vLLM rerank clients; accepted and not used (items are cut to
    # the model's limit like every other item).
    model: str | None = None
    max_tokens_per_doc: int | None = None
    priority: int | None = None
    rank_fields: list[str] | None = None
    max_chunks_per_doc: int | None = None
    request_id: str | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> RerankRequest:
        given = [x is not None for x in (self.prompt, self.messages, self.query)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, messages or query")
        if (self.candidates is None) == (self.documents is None):
            raise ValueError("give exactly one of candidates or documents")
        if self.top_k is not None and self.top_n is not None:
            raise ValueError("give at most one of top_k or top_n")
        return self

    def responses(self) -> list[str]:
        """The candidate responses, in request order."""
        if self.candidates is not None:
            return self.candidates
        assert self.documents is not None
        return [d if isinstance(d, str) else d.text for d in self.documents]

    def echoes_documents(self) -> bool:
        """Whether results carry their documents."""
        if self.return_documents is not None:
            return self.return_documents
        return self.documents is not None

    def limit(self) -> int | None:
        """How many results to return (None: all)."""
        return self.top_k if self.top_k is not None else (self.top_n or None)

    def items(self) -> list[Item]:
        """Each candidate as a scoreable item: the prompt (or chat) plus its response."""
        prompt = self.prompt if self.prompt is not None else self.query
        if prompt is not None:
            return [Item(prompt=prompt, response=c) for c in self.responses()]
        assert self.messages is not None
        return [
            Item(messages=[*self.messages, Message(role="assistant", content=c)])
            for c in self.responses()
        ]


class RerankResult(BaseModel):
    """One candidate, ranked: `index` is its position in the request, `rank` 0 is the best."""

    index: int
    rank: int
    reward: float
    relevance_score: float = Field(
        description="Cohere/Jina/vLLM's score: sigmoid(reward), or the reward when the "
        "request sets use_activation false."
    )
    advantage: float = Field(description="(reward - group mean) / group std; 0 if std is 0.")
    rewards: list[float] | None = None
    n_tokens: int
    truncated: bool
    document: Document | None = Field(None, description="With return_documents: the document.")


class RerankResponse(BaseModel):
    """Response of POST /v1/rerank: candidates best first."""

    id: str = Field(default_factory=lambda: f"rerank-{uuid.uuid4().hex[:16]}")
    model: str
    results: list[RerankResult]
    best_index: int
    mean: float
    std: float = Field(description="Sample standard deviation (n - 1) of the group's rewards.")
    usage: Usage

    @classmethod
    def ranking(
        cls,
        scored: Sequence[ScoreResult],
        model: str,
        *,
        limit: int | None = None,
        documents: Sequence[Document] | None = None,
        activation: bool = True,
    ) -> RerankResponse:
        """The group `scored` (in candidate order) ranked best first, cut to `limit` results;
        `documents`: echoed in each result; `activation`: relevance_score is sigmoid(reward),
        else the reward itself (a regression head's scores are never squashed)."""
        ranking = rank([r.reward for r in scored])
        top = ranking.order[:limit] if limit is not None else ranking.order
        results = [
            RerankResult(
                index=i,
                rank=position,
                reward=scored[i].reward,
                relevance_score=sigmoid(scored[i].reward) if activation else scored[i].reward,
                advantage=ranking.advantages[i],
                rewards=scored[i].rewards,
                n_tokens=scored[i].n_tokens,
                truncated=scored[i].truncated,
                document=documents[i] if documents is not None else None,
            )
            for position, i in enumerate(top)
        ]
        usage = Usage(
            items=len(scored),
            tokens=sum(r.n_tokens for r in scored),
            truncated_items=sum(r.truncated for r in scored),
        )
        return cls(
            model=model,
            results=results,
            best_index=ranking.order[0],
            mean=ranking.mean,
            std=ranking.std,
            usage=usage,
        )


class Limits(BaseModel):
    """What one request may contain; clients chunk their batches to fit."""

    max_items_per_request: int
    max_chars_per_item: int
    max_tokens_per_item: int
    max_body_bytes: int
    max_batch_size: int
    max_batch_tokens: int


class CalibrationCard(BaseModel):
    """What the artifact's calibration (warm-merge calibrate) recorded about its rewards."""

    mean: float = Field(description="Mean reward of the reference responses.")
    std: float = Field(description="Their population standard deviation.")
    quantiles: list[float] = Field(
        description="Their quantiles at probabilities 0, 0.01, ..., 1 (`quantile` "
        "normalisation interpolates linearly between them)."
    )
    temperature: float = Field(
        description="Bradley-Terry temperature T: P(a preferred over b) = "
        "sigmoid((reward_a - reward_b) / T)."
    )
    responses: int = Field(description="Reference responses the statistics describe.")
    data_sha256: str = Field(description="SHA-256 of the preference data calibrated on.")


class Scale(BaseModel):
    """What `reward` means on this server."""

    reward: Literal["raw"] = Field(
        "raw", description="The reward head's output is a raw logit, unnormalised."
    )
    default_normalize: Normalize = Field(
        "none",
        description="What a response's `reward` carries when the request does not say "
        "(the server's --normalize).",
    )
    calibration: CalibrationCard | None = Field(
        None, description="Present when the artifact is calibrated."
    )


class SelfCheckCard(BaseModel):
    """The startup self-check (the artifact's golden set through the serving path)."""

    status: Literal["passed", "warned", "skipped", "off"]
    checked: int = Field(description="Golden responses scored.")
    max_deviation: float | None = Field(
        description="Largest |served - recorded| reward (null: a served reward was not finite)."
    )
    tolerance: float = Field(description="The largest allowed, by the trunk's dtype.")
    detail: str = Field(description="The worst item, or why nothing was checked.")
    seconds: float = Field(description="How long scoring the golden set took.")


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
    dtype: str = Field(description="The dtype the model's trunk runs in.")
    head_dtype: str = Field(
        "float32",
        description="The dtype the reward head runs in, on the trunk's last hidden state cast "
        "to it: float32 on both backends whatever the trunk's dtype.",
    )
    device: str
    backend: str
    compiled: bool = Field(
        False, description="The transformers backend runs the model through torch.compile."
    )
    max_length: int
    chat_template: bool
    limits: Limits
    scale: Scale = Field(default_factory=Scale)
    self_check: SelfCheckCard | None = None


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

    rewards: list[float] = Field(
        description="Raw rewards (normalised where the server's --normalize says so)."
    )
    scores: list[float] = Field(
        description="Each reward's quantile in [0, 1] among the calibration's reference "
        "responses when the artifact is calibrated (OpenRLHF filters on it), else the raw reward."
    )
    extra_logs: dict[str, list[float]]


class Status(BaseModel):
    """Response of /health and /ready."""

    status: str
