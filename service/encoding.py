"""Items -> token ids: render with the RM's input contract, tokenise, truncate by side.

Every backend scores the ids made here, so all of them see identical tokens. Over-long
items are re-encoded with the tokenizer's own truncation (special tokens survive) and
reported as truncated. Called from a single tokenisation thread: each side has its own
tokenizer copy whose truncation settings never change, so no call mutates shared state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from merger.formatting import render
from service.errors import ErrorType, ServiceError
from service.protocol import Item

NO_LIMIT = 1 << 62


@dataclass(frozen=True)
class Encoded:
    """One item's token ids after truncation."""

    ids: list[int]
    truncated: bool


class Encoder:
    """Renders and tokenises items for one model."""

    def __init__(self, tokenizer: Any, *, max_length: int, separator: str) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.separator = separator
        self._full = copy.deepcopy(tokenizer)
        self._full.model_max_length = NO_LIMIT  # measuring full length is not an error
        self._side: dict[str, Any] = {}
        for side in ("left", "right"):
            self._side[side] = copy.deepcopy(tokenizer)
            self._side[side].truncation_side = side

    @property
    def chat_template(self) -> bool:
        """Whether pairs and chats are rendered by the tokenizer's chat template."""
        return bool(self.tokenizer.chat_template)

    def render(self, item: Item) -> str:
        """The text the reward model scores for one item."""
        messages = None if item.messages is None else [m.model_dump() for m in item.messages]
        return render(
            self.tokenizer,
            text=item.text,
            prompt=item.prompt,
            response=item.response,
            messages=messages,
            separator=self.separator,
        )

    def render_all(self, items: list[Item]) -> list[str]:
        """Render every item; a failure names the item."""
        texts = []
        for index, item in enumerate(items):
            try:
                texts.append(self.render(item))
            except (ValueError, TypeError, TemplateError) as error:
                raise ServiceError(
                    ErrorType.INVALID_REQUEST, f"items[{index}]: cannot render: {error}"
                ) from error
        return texts

    def encode_texts(self, texts: list[str], side: str) -> list[Encoded]:
        """Token ids of rendered texts, truncated to max_length from `side`."""
        full = self._full(texts, truncation=False)["input_ids"]
        encoded = [Encoded(list(ids), False) for ids in full]
        long = [i for i, ids in enumerate(full) if len(ids) > self.max_length]
        if long:
            cut = self._side[side](
                [texts[i] for i in long], truncation=True, max_length=self.max_length
            )["input_ids"]
            for i, ids in zip(long, cut, strict=True):
                encoded[i] = Encoded(list(ids), True)
        empty = [i for i, e in enumerate(encoded) if not e.ids]
        if empty:
            raise ServiceError(
                ErrorType.INVALID_REQUEST, f"items[{empty[0]}]: renders to no tokens"
            )
        return encoded

    def encode(self, items: list[Item], side: str) -> list[Encoded]:
        """Render and tokenise request items."""
        return self.encode_texts(self.render_all(items), side)
