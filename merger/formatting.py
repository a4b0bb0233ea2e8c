"""The reward model's input contract: a prompt/response pair, a chat or raw text -> one string.

Fine-tuning, diagnostics and the reward service all render through `render`, so a reward
model is always scored on text laid out exactly as it was trained on. Pure: it takes a
tokenizer object and reads no files.

- With a chat template (`tokenizer.chat_template`): (prompt, response) becomes the chat
  [user: prompt, assistant: response]; chats are rendered by the template without a
  generation prompt (the assistant turn is already there), and a leading BOS string is
  dropped when the tokenizer inserts BOS itself while encoding, so it is never doubled.
- Without one: prompt + separator + response; a chat is its contents joined by the
  separator (roles dropped), so [user, assistant] renders exactly like (prompt, response).
"""

from __future__ import annotations

from typing import Any, Protocol

ROLES = frozenset({"system", "user", "assistant"})
DEFAULT_SEPARATOR = "\n\n"


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer that rendering uses."""

    chat_template: str | dict[str, str] | None
    bos_token: str | None
    bos_token_id: int | None

    def __call__(self, text: str) -> Any:
        """Encode one string; the result maps "input_ids" to a list of ids."""

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any:
        """Render a conversation with the tokenizer's chat template."""


def check_messages(messages: list[dict[str, str]]) -> None:
    """Raise ValueError unless messages is a non-empty list of {role, content} strings."""
    if not messages:
        raise ValueError("messages is empty: give at least one {role, content} message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            keys = sorted(message) if isinstance(message, dict) else type(message).__name__
            raise ValueError(f"messages[{i}]: expected keys role and content, got {keys}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(
                f"messages[{i}]: unknown role {role!r} (expected one of {sorted(ROLES)})"
            )
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]: content is {type(content).__name__}, not a string")


def adds_bos(tokenizer: Tokenizer) -> bool:
    """Whether encoding with this tokenizer inserts its BOS token by itself."""
    if tokenizer.bos_token_id is None:
        return False
    ids = list(tokenizer("x")["input_ids"])
    return ids[:1] == [tokenizer.bos_token_id]


def _from_template(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> str:
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if not isinstance(rendered, str):
        raise ValueError(f"chat template rendered {type(rendered).__name__}, expected a string")
    bos = tokenizer.bos_token
    # Templates write BOS as text and most tokenizers add it again when encoding: keep one.
    if bos and rendered.startswith(bos) and adds_bos(tokenizer):
        rendered = rendered[len(bos) :]
    return rendered


def render(
    tokenizer: Tokenizer,
    *,
    prompt: str | None = None,
    response: str | None = None,
    messages: list[dict[str, str]] | None = None,
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
    return separator.join(m["content"] for m in messages)
