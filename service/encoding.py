"""Items -> token ids: render with the RM's input contract, tokenise, truncate by side.

Every backend scores the ids made here, so all of them see identical tokens. The special
tokens the tokenizer adds (BOS, [CLS]/[SEP]) appear exactly once, also for texts that carry
them already (`merger.formatting.TokenLayout`); over-long items lose tokens from one side,
the special tokens kept, and are reported as truncated. Called from a single tokenisation
thread.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from jinja2 import TemplateError

from merger.formatting import TokenLayout, render
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

    def __init__(
        self, tokenizer: Any, *, max_length: int, separator: str, vocab_size: int | None = None
    ) -> None:
        """`vocab_size`: the model's embedding rows (token ids given directly must be below
        it; default: the tokenizer's size). ValueError if the tokenizer can produce an id past
        the embedding (on a GPU, a device-side assert that breaks the device for good), or if
        its special tokens leave no room within max_length."""
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.separator = separator
        self.vocab_size = vocab_size or len(tokenizer)
        largest = max(tokenizer.get_vocab().values(), default=-1)
        if largest >= self.vocab_size:
            raise ValueError(
                f"the tokenizer has token id {largest}, but the model's embedding has "
                f"{self.vocab_size} rows: a tokenizer of another model?"
            )
        self._full = copy.deepcopy(tokenizer)
        self._full.model_max_length = NO_LIMIT  # measuring full length is not an error
        self.layout = TokenLayout.of(tokenizer, max_length)

    @property
    def chat_template(self) -> bool:
        """Whether pairs and chats are rendered by the tokenizer's chat template."""
        return bool(self.tokenizer.chat_template)

    def render(self, item: Item) -> str:
        """The text the reward model scores for one item."""
        messages = None
        if item.messages is not None:
            messages = [m.as_turn() for m in item.messages]
        return render(
            self.tokenizer,
            text=item.text,
            prompt=item.prompt,
            response=item.response,
            messages=messages,
            separator=self.separator,
        )

    def render_all(self, items: list[Item]) -> list[str]:
        """Render every item; a failure (a template refusing a role, ...) names the item."""
        texts = []
        for index, item in enumerate(items):
            try:
                texts.append(self.render(item))
            except (ValueError, TypeError, TemplateError) as error:
                raise ServiceError(
                    ErrorType.INVALID_REQUEST, f"items[{index}]: cannot render: {error}"
                ) from error
        return texts

    def encode_texts(
        self,
        texts: list[str],
        side: str,
        *,
        max_length: int | None = None,
        special_tokens: bool = True,
    ) -> list[Encoded]:
        """Token ids of rendered texts, cut to `max_length` (default and at most the model's)
        from `side`; without `special_tokens`, the texts' own tokens only."""
        layout = self._layout(max_length, special_tokens)
        encoded = [Encoded(ids, cut) for ids, cut in layout.encode(self._full, texts, side)]
        empty = [i for i, e in enumerate(encoded) if not e.ids]
        if empty:
            raise ServiceError(
                ErrorType.INVALID_REQUEST, f"items[{empty[0]}]: renders to no tokens"
            )
        return encoded

    def encode(
        self,
        items: list[Item],
        side: str,
        *,
        max_length: int | None = None,
        special_tokens: bool = True,
    ) -> list[Encoded]:
        """Render and tokenise request items."""
        texts = self.render_all(items)
        return self.encode_texts(texts, side, max_length=max_length, special_tokens=special_tokens)

    def encode_ids(
        self, sequences: Sequence[Sequence[int]], side: str, *, max_length: int | None = None
    ) -> list[Encoded]:
        """Token ids given by the client, checked against the vocabulary and cut to fit."""
        limit = self.max_length if max_length is None else max_length
        if not 0 < limit <= self.max_length:
            raise ServiceError(
                ErrorType.INVALID_REQUEST,
                f"max_length {limit}: a request may cut items to 1-{self.max_length} tokens",
            )
        encoded = []
        for index, ids in enumerate(sequences):
            if not ids:
                raise ServiceError(ErrorType.INVALID_REQUEST, f"input[{index}]: no token ids")
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ServiceError(
                    ErrorType.INVALID_REQUEST,
                    f"input[{index}]: token id {bad} is outside the vocabulary "
                    f"[0, {self.vocab_size})",
                )
            kept = list(ids[len(ids) - limit :] if side == "left" else ids[:limit])
            encoded.append(Encoded(kept, len(ids) > limit))
        return encoded

    def _layout(self, max_length: int | None, special_tokens: bool) -> TokenLayout:
        layout = self.layout
        if max_length is not None and not 0 < max_length <= self.max_length:
            raise ServiceError(
                ErrorType.INVALID_REQUEST,
                f"max_length {max_length}: a request may cut items to 1-{self.max_length} tokens",
            )
        if max_length is not None and max_length != layout.max_length:
            try:
                layout = replace(layout, max_length=max_length)
            except ValueError as error:
                raise ServiceError(ErrorType.INVALID_REQUEST, str(error)) from error
        if not special_tokens:
            layout = replace(layout, prefix=(), suffix=())
        return layout
