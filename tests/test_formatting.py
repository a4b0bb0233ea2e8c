"""The RM input contract: separator layout, chat templates without doubled BOS, bad inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import BOS_ID
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from merger.formatting import render

# A minimal Zephyr-like template: BOS as text, a closing </s> per turn, a generation prompt.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Why is the sky blue?"},
    {"role": "assistant", "content": "Rayleigh scattering."},
]


@pytest.fixture
def tok(tiny_tokenizer_dir: Path) -> Any:
    """A fresh tiny tokenizer (tests mutate its template and post-processor)."""
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def add_bos_on_encode(tokenizer: Any) -> None:
    """Make the tokenizer insert <s> itself when encoding, as Llama-style tokenizers do."""
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    assert tokenizer("x")["input_ids"][0] == BOS_ID


def test_separator_layout(tok: Any) -> None:
    assert tok.chat_template is None
    assert render(tok, prompt="Hi?", response="Hello.") == "Hi?\n\nHello."
    assert render(tok, prompt="Hi?", response="Hello.", separator=" | ") == "Hi? | Hello."
    assert render(tok, messages=CHAT) == "Be brief.\n\nWhy is the sky blue?\n\nRayleigh scattering."
    assert render(tok, prompt="", response="") == "\n\n"
    assert render(tok, text="raw <s> text") == "raw <s> text"


def test_pair_renders_like_its_chat(tok: Any) -> None:
    chat = CHAT[1:]
    plain = render(tok, prompt=chat[0]["content"], response=chat[1]["content"])
    assert plain == render(tok, messages=chat)
    tok.chat_template = TEMPLATE
    templated = render(tok, prompt=chat[0]["content"], response=chat[1]["content"])
    assert templated == render(tok, messages=chat)
    assert templated != plain


def test_chat_template_keeps_bos_when_the_tokenizer_does_not_add_it(tok: Any) -> None:
    tok.chat_template = TEMPLATE
    expected = "<s><|user|>Hi?</s><|assistant|>Hello.</s>"
    assert render(tok, prompt="Hi?", response="Hello.") == expected
    ids = tok(expected)["input_ids"]
    assert ids.count(BOS_ID) == 1


def test_chat_template_drops_bos_the_tokenizer_adds(tok: Any) -> None:
    tok.chat_template = TEMPLATE
    add_bos_on_encode(tok)
    rendered = render(tok, messages=CHAT)
    # No leading BOS and no trailing generation prompt.
    assert rendered == (
        "<|system|>Be brief.</s><|user|>Why is the sky blue?</s>"
        "<|assistant|>Rayleigh scattering.</s>"
    )
    ids = tok(rendered)["input_ids"]
    assert ids[0] == BOS_ID
    assert ids.count(BOS_ID) == 1


def test_template_without_bos_is_left_alone(tok: Any) -> None:
    tok.chat_template = TEMPLATE.removeprefix("{{ bos_token }}")
    add_bos_on_encode(tok)
    assert render(tok, prompt="a", response="b") == "<|user|>a</s><|assistant|>b</s>"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one.*got none"),
        ({"text": "t", "messages": CHAT}, "text and messages"),
        ({"text": "t", "prompt": "p", "response": "r"}, "text and prompt/response"),
        ({"prompt": "p"}, "response is missing"),
        ({"response": "r"}, "prompt is missing"),
        ({"messages": []}, "messages is empty"),
        ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\]: unknown role 'robot'"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\]: expected keys role and content"),
        ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\]: content is int"),
    ],
)
def test_bad_combinations(tok: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render(tok, **kwargs)
