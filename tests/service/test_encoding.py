"""The encoder: rendering and truncation, against hand-computed expectations."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from merger.formatting import DEFAULT_SEPARATOR
from service.encoding import Encoder
from service.errors import ErrorType, ServiceError
from service.protocol import Item, Message

# --- encoding -------------------------------------------------------------------------------

LONG = " ".join(
    [
        "The assistant explains the question clearly and politely.",
        "A helpful model summarises a short poem about the quiet sea.",
        "The reward model ranks two responses and prefers the honest one.",
    ]
)


@pytest.fixture(scope="module")
def tiny_tok(tiny_tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def minilm_tok(minilm_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.mark.parametrize("name", ["tiny_tok", "minilm_tok"])
def test_encoder_short_texts_untouched(name: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(name)
    texts = ["The answer ranks", "Our policy refuses a harmful request."]
    encoded = Encoder(tok, max_length=64, separator=DEFAULT_SEPARATOR).encode_texts(texts, "left")
    assert [e.ids for e in encoded] == [tok(t)["input_ids"] for t in texts]
    assert [e.truncated for e in encoded] == [False, False]


@pytest.mark.parametrize("side", ["left", "right"])
def test_encoder_truncates_tiny(tiny_tok: Any, side: str) -> None:
    full = tiny_tok(LONG)["input_ids"]
    assert len(full) > 8
    encoder = Encoder(tiny_tok, max_length=8, separator=DEFAULT_SEPARATOR)
    long, short = encoder.encode_texts([LONG, "The answer"], side)
    assert long.truncated and len(long.ids) == 8
    # No special tokens: 'left' keeps the last 8 ids, 'right' the first 8.
    assert long.ids == (full[-8:] if side == "left" else full[:8])
    assert not short.truncated and short.ids == tiny_tok("The answer")["input_ids"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_encoder_truncates_minilm_keeping_specials(minilm_tok: Any, side: str) -> None:
    full = minilm_tok(LONG)["input_ids"]
    cls_id, sep_id = minilm_tok.cls_token_id, minilm_tok.sep_token_id
    assert full[0] == cls_id and full[-1] == sep_id and len(full) > 8
    (long,) = Encoder(minilm_tok, max_length=8, separator="\n\n").encode_texts([LONG], side)
    assert long.truncated and len(long.ids) == 8
    # [CLS] + 6 content ids + [SEP]: the content's tail for 'left', its head for 'right'.
    body = full[1:-1]
    assert long.ids == [cls_id, *(body[-6:] if side == "left" else body[:6]), sep_id]


def test_encoder_does_not_mutate_tokenizer(tiny_tok: Any) -> None:
    before = (tiny_tok.truncation_side, tiny_tok.model_max_length)
    Encoder(tiny_tok, max_length=4, separator="\n\n").encode_texts([LONG], "left")
    assert (tiny_tok.truncation_side, tiny_tok.model_max_length) == before


@pytest.mark.parametrize("separator", [DEFAULT_SEPARATOR, " ||| "])
def test_render_without_chat_template(tiny_tok: Any, separator: str) -> None:
    encoder = Encoder(tiny_tok, max_length=64, separator=separator)
    assert not encoder.chat_template
    assert encoder.render(Item(prompt="Q?", response="A.")) == f"Q?{separator}A."
    chat = Item(
        messages=[Message(role="user", content="Q?"), Message(role="assistant", content="A.")]
    )
    assert encoder.render(chat) == f"Q?{separator}A."
    assert encoder.render(Item(text="raw")) == "raw"


def _with_template(tok: Any, template: str) -> Any:
    templated = copy.deepcopy(tok)
    templated.chat_template = template
    return templated


def test_render_with_chat_template(tiny_tok: Any) -> None:
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    encoder = Encoder(_with_template(tiny_tok, template), max_length=64, separator=" | ")
    assert encoder.chat_template
    assert encoder.render(Item(prompt="Q", response="A")) == "[user]Q[assistant]A"
    chat = [Message(role="system", content="S"), Message(role="user", content="Q")]
    assert encoder.render(Item(messages=chat)) == "[system]S[user]Q"
    assert encoder.render(Item(text="raw")) == "raw"  # raw text bypasses the template


def test_empty_render_is_invalid_request(tiny_tok: Any, minilm_tok: Any) -> None:
    assert tiny_tok("")["input_ids"] == []  # no special tokens added: "" is truly empty
    encoder = Encoder(tiny_tok, max_length=64, separator="\n\n")
    with pytest.raises(ServiceError) as info:
        encoder.encode([Item(text="The answer"), Item(text="")], "left")
    assert info.value.type is ErrorType.INVALID_REQUEST and info.value.status == 422
    assert "items[1]" in info.value.message and "no tokens" in info.value.message
    # MiniLM adds [CLS] [SEP], so "" is two tokens and is scored.
    (empty,) = Encoder(minilm_tok, max_length=64, separator="\n\n").encode([Item(text="")], "left")
    assert empty.ids == [minilm_tok.cls_token_id, minilm_tok.sep_token_id]
    assert not empty.truncated


def test_render_all_failure_names_item(tiny_tok: Any) -> None:
    template = (
        "{% if messages[0]['content'] == 'bad' %}{{ raise_exception('bad prompt') }}{% endif %}"
        "{{ messages[0]['content'] }}"
    )
    encoder = Encoder(_with_template(tiny_tok, template), max_length=64, separator="\n\n")
    items = [Item(text="fine"), Item(prompt="ok", response="r"), Item(prompt="bad", response="r")]
    assert encoder.render_all(items[:2]) == ["fine", "ok"]
    with pytest.raises(ServiceError) as info:
        encoder.render_all(items)
    assert info.value.type is ErrorType.INVALID_REQUEST
    assert info.value.message.startswith("items[2]: cannot render") and "bad prompt" in str(
        info.value
    )
