"""Request and response bodies of other servers' APIs that warm-serve answers as a drop-in.

- vLLM's pooling API (vLLM 0.32): `POST /classify` and `POST /pooling` (verl's reward loop
  and vLLM clients), `POST /v1/embeddings` (verl's SGLang path, which reads the raw reward
  as `data[-1].embedding[-1]`).
- text-embeddings-inference's `POST /predict` (TEI 1.9).

Like vLLM's and TEI's, these request models ignore fields they do not know. Every item they
carry becomes a `protocol.Item`, scored with all other traffic; the pure helpers below turn
raw head outputs into each API's numbers.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.protocol import Message, sigmoid

Datum = TypeVar("Datum", bound=BaseModel)
# A batch of token-id lists, a token-id list, a batch of texts, or one text (vLLM's order).
PoolingInput = list[list[int]] | list[int] | list[str] | str


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


def request_id(prefix: str, given: str | None = None) -> str:
    """vLLM's response id: the endpoint's prefix and the request's id (X-Request-Id, else the
    body's request_id), else 16 random hex digits."""
    return f"{prefix}-{given or f'{uuid.uuid4().int & ((1 << 64) - 1):016x}'}"


class PoolingRequest(_Lenient):
    """POST /classify, /pooling and /v1/embeddings, as vLLM takes them: `input` (or chat
    `messages`) plus the options a reward client sets."""

    model: str | None = Field(None, description="A served model name (see --served-model-name).")
    input: PoolingInput | None = Field(
        None, description="A text, a list of texts, a list of token ids, or a batch of them."
    )
    messages: list[Message] | None = Field(
        None, min_length=1, description="One chat, rendered by the model's chat template."
    )
    use_activation: bool | None = Field(
        None,
        description="false: the raw reward. Default (null) as vLLM: a sigmoid for a 1-label "
        "head, a softmax over several labels.",
    )
    activation: bool | None = Field(
        None, description="Older vLLM releases' name for use_activation (verl before 0.9)."
    )
    add_special_tokens: bool | None = Field(
        None,
        description="Add the tokenizer's special tokens (BOS) to texts; a text that already "
        "starts with them keeps one copy. Default: true for `input`, false for `messages`.",
    )
    truncate_prompt_tokens: int | None = Field(
        None, description="Keep at most this many tokens, >= 1 (-1: the model's limit)."
    )
    truncation_side: Literal["left", "right"] | None = None
    request_id: str | None = Field(None, description="The response id's suffix (vLLM's).")
    task: str | None = Field(None, description="/pooling only: 'classify' (or null).")
    encoding_format: Literal["float"] = Field("float", description="/pooling: floats only.")

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "normalize" in data:
            raise ValueError("Parameter `normalize` was removed; use `use_activation` instead.")
        return data

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and value < 1:
            raise ValueError("truncate_prompt_tokens must be -1 or at least 1")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> PoolingRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of input or messages")
        return self

    def wants_activation(self) -> bool:
        """Whether the response applies the head's activation (vLLM's default: yes)."""
        for value in (self.use_activation, self.activation):
            if value is not None:
                return value
        return True


class UsageInfo(BaseModel):
    """vLLM's usage block."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: None = None
    completion_tokens_details: None = None


class ClassificationData(BaseModel):
    """One input's outputs: `probs` after the activation (raw with use_activation false)."""

    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class PoolingList(BaseModel, Generic[Datum]):
    """vLLM's list response: an id, the model's name, one datum per input, the usage."""

    id: str
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[Datum]
    usage: UsageInfo


class ClassificationResponse(PoolingList[ClassificationData]):
    """Response of POST /classify."""


class PoolingData(BaseModel):
    """One input's pooled outputs."""

    index: int
    object: str = "pooling"
    data: list[float]


class PoolingResponse(PoolingList[PoolingData]):
    """Response of POST /pooling."""


class EmbeddingData(BaseModel):
    """One input's head outputs, raw (SGLang's reward-model embedding)."""

    index: int
    object: str = "embedding"
    embedding: list[float]


class EmbeddingResponse(PoolingList[EmbeddingData]):
    """Response of POST /v1/embeddings."""


def activated(outputs: Sequence[float], problem_type: str | None) -> list[float]:
    """vLLM's and TEI's classification activation of one item's head outputs, by the config's
    problem_type: identity for "regression", a sigmoid per label for
    "multi_label_classification"; otherwise a sigmoid for one label and a softmax
    (max-subtracted) over several."""
    values = [float(x) for x in outputs]
    if problem_type == "regression":
        return values
    if len(values) == 1 or problem_type == "multi_label_classification":
        return [sigmoid(v) for v in values]
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


# TEI /predict -------------------------------------------------------------------------------


class PredictRequest(_Lenient):
    """POST /predict, as TEI takes it. `inputs`: a text, a [prompt, response] pair, or a batch
    of [text] and [prompt, response] lists (TEI reads ["a", "b"] as one pair)."""

    inputs: str | list[str] | list[list[str]]
    truncate: bool | None = Field(
        None, description="Cut over-long inputs (default, as TEI 1.9); false: refuse them."
    )
    truncation_direction: Literal["Left", "left", "Right", "right"] = "Right"
    raw_scores: bool = Field(False, description="true: raw rewards; false: sigmoid/softmax.")

    @field_validator("inputs")
    @classmethod
    def _shape(cls, value: str | list[str] | list[list[str]]) -> Any:
        if isinstance(value, str):
            return value
        if value and all(isinstance(v, str) for v in value):
            if len(value) > 2:
                raise ValueError(
                    f"invalid length {len(value)}, expected a string, a pair of strings "
                    "[string, string] or a batch of mixed strings and pairs "
                    "[[string], [string, string], ...]"
                )
            return value
        for i, entry in enumerate(value):
            if not isinstance(entry, list) or not 1 <= len(entry) <= 2:
                raise ValueError(f"inputs[{i}]: expected [string] or [string, string]")
        return value

    def batch(self) -> tuple[list[list[str]], bool]:
        """The inputs as a list of [text] / [prompt, response], and whether it was a batch."""
        if isinstance(self.inputs, str):
            return [[self.inputs]], False
        if not self.inputs:
            return [], True
        pair = [v for v in self.inputs if isinstance(v, str)]
        if len(pair) == len(self.inputs):
            return [pair], False
        return [list(v) for v in self.inputs if isinstance(v, list)], True


class Prediction(BaseModel):
    """One label's score."""

    score: float
    label: str


def predictions(
    outputs: Sequence[float], labels: Sequence[str], raw: bool, problem_type: str | None
) -> list[Prediction]:
    """TEI's per-input answer: one score per label, best first."""
    scores = [float(x) for x in outputs] if raw else activated(outputs, problem_type)
    ranked = sorted(zip(scores, labels, strict=True), key=lambda pair: -pair[0])
    return [Prediction(score=score, label=label) for score, label in ranked]
