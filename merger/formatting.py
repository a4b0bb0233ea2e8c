"""The reward model's input contract: a prompt/response pair, a chat or raw text -> token ids.

Fine-tuning, diagnostics and the reward service all render through `render` and tokenise
through `TokenLayout`, so a reward model is always scored on exactly the tokens it was
trained on. Pure: it takes a tokenizer object and reads no files.

Rendering (`render`):
- With a chat template (`tokenizer.chat_template`): (prompt, response) becomes the chat
  [user: prompt, assistant: response]; chats are rendered by the template without a
  generation prompt (the assistant turn is already there), exactly as
  `tokenizer.apply_chat_template(messages, tokenize=False)` renders them, BOS text included.
  The template decides which roles it accepts (`tool` turns and the like included).
- Without one: prompt + separator + response; a chat is its contents joined by the
  separator (roles dropped), so [user, assistant] renders exactly like (prompt, response).

Tokenising (`TokenLayout`): the text's own tokens, with the special tokens the tokenizer
adds around a sequence (BOS, or BERT's [CLS] ... [SEP]) added once: a text that already
starts with them (a template's BOS, OpenRLHF's preformatted queries) is not given a
second copy. Over-long texts are cut on one side, the special tokens kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

DEFAULT_SEPARATOR = "\n\n"
# Message keys passed through to chat templates beside role and content (OpenAI's chat
# format: tool calls and their results).
OPTIONAL_MESSAGE_KEYS = frozenset({"name", "tool_calls", "tool_call_id", "reasoning_content"})
PROBE = "x"


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer that rendering and tokenising use."""

    chat_template: str | dict[str, str] | None

    def __call__(self, text: Any, **kwargs: Any) -> Any:
        """Encode one string or a list; the result maps "input_ids" to ids."""

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> Any:
        """Render a conversation with the tokenizer's chat template."""


def check_messages(messages: Sequence[dict[str, Any]]) -> None:
    """Raise ValueError unless messages is a non-empty list of {role, content} dicts with
    string values (plus the optional keys chat templates read, e.g. tool_calls)."""
    if not messages:
        raise ValueError("messages is empty: give at least one {role, content} message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            keys = sorted(message) if isinstance(message, dict) else type(message).__name__
            raise ValueError(f"messages[{i}]: expected keys role and content, got {keys}")
        unknown = set(message) - {"role", "content"} - OPTIONAL_MESSAGE_KEYS
        if unknown:
            raise ValueError(f"messages[{i}]: unknown keys {sorted(unknown)}")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}]: role must be a non-empty string")
        if content is None and message.get("tool_calls"):
            continue  # an assistant turn that only calls tools
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]: content is {type(content).__name__}, not a string")


def _from_template(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> str:
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if not isinstance(rendered, str):
        raise ValueError(f"chat template rendered {type(rendered).__name__}, expected a string")
    return rendered


def render(
    tokenizer: Tokenizer,
    *,
    prompt: str | None = None,
    response: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    text: str | None = None,
    separator: str = DEFAULT_SEPARATOR,
) -> str:
    """The text a reward model scores: give exactly one of text, (prompt, response), messages."""
    pair = prompt is not None or response is not None
    choices = {"text": text is not None, "prompt/response": pair, "messages": messages is not None}
    given = [name for name, on in choices.items() if on]
    if len(given) != 1:
        found = " and ".join(given) if given else "none"
        raise ValueError(f"give exactly one of text, prompt/response or messages (got {found})")
    if text is not None:
        return text
    if pair:
        if prompt is None or response is None:
            missing = "response" if response is None else "prompt"
            raise ValueError(f"prompt and response go together: {missing} is missing")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    assert messages is not None
    check_messages(messages)
    if tokenizer.chat_template:
        return _from_template(tokenizer, messages)
    return separator.join(m["content"] for m in messages if m["content"] is not None)


@dataclass(frozen=True)
class TokenLayout:
    """The special tokens a tokenizer puts around one sequence, and the truncation rule.

    `ids(content)` is `prefix + content + suffix`, where `content` is the text's tokens
    without special tokens; a content that already starts with the prefix keeps its own
    copy only. An item longer than `max_length` loses content tokens from `side`.
    """

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    max_length: int

    def __post_init__(self) -> None:
        if len(self.prefix) + len(self.suffix) >= self.max_length:
            raise ValueError(
                f"max_length {self.max_length} leaves no room for content beside the "
                f"{len(self.prefix) + len(self.suffix)} special tokens the tokenizer adds"
            )

    @classmethod
    def of(cls, tokenizer: Tokenizer, max_length: int) -> TokenLayout:
        """The layout of `tokenizer`, found by encoding a probe with and without its special
        tokens (ValueError if they are not a prefix and a suffix around the text's tokens)."""
        full = list(tokenizer(PROBE)["input_ids"])
        bare = list(tokenizer(PROBE, add_special_tokens=False)["input_ids"])
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                prefix, suffix = full[:start], full[start + len(bare) :]
                return cls(tuple(prefix), tuple(suffix), max_length)
        raise ValueError(
            f"the tokenizer's special tokens are not a prefix and suffix: {PROBE!r} encodes "
            f"to {full} with them and {bare} without"
        )

    def ids(self, content: Sequence[int], side: str = "left") -> tuple[list[int], bool]:
        """The item's token ids and whether content was cut to fit `max_length` (from the
        start for side "left", else from the end)."""
        prefix, suffix = list(self.prefix), list(self.suffix)
        body = list(content)
        if prefix and body[: len(prefix)] == prefix:
            body = body[len(prefix) :]  # the text carries the prefix already: keep one
        room = self.max_length - len(prefix) - len(suffix)
        truncated = len(body) > room
        if truncated:
            body = body[len(body) - room :] if side == "left" else body[:room]
        return prefix + body + suffix, truncated

    def encode(
        self, tokenizer: Tokenizer, texts: Sequence[str], side: str
    ) -> list[tuple[list[int], bool]]:
        """Token ids (and truncation flags) of rendered texts, in order."""
        if not texts:
            return []
        contents = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [self.ids(content, side) for content in contents]
