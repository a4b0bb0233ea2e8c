"""The RM input contract: separator layout, chat templates, one BOS, truncation, bad inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tiny_models import BOS_ID
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from merger.formatting import TokenLayout, render

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
    ((ids, cut),) = TokenLayout.of(tok, 512).encode(tok, [expected], "left")
    assert ids == tok(expected)["input_ids"] and not cut
    assert ids.count(BOS_ID) == 1


def test_a_bos_in_the_template_and_from_the_tokenizer_gives_one_bos(tok: Any) -> None:
    tok.chat_template = TEMPLATE
    add_bos_on_encode(tok)
    rendered = render(tok, messages=CHAT)
    # The template's text, as apply_chat_template renders it: no generation prompt.
    assert rendered == tok.apply_chat_template(CHAT, tokenize=False)
    assert rendered == (
        "<s><|system|>Be brief.</s><|user|>Why is the sky blue?</s>"
        "<|assistant|>Rayleigh scattering.</s>"
    )
    assert tok(rendered)["input_ids"][:2] == [BOS_ID, BOS_ID]  # what a naive encode does
    ((ids, _),) = TokenLayout.of(tok, 512).encode(tok, [rendered], "left")
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
    # A text without the BOS gets the tokenizer's: the same ids.
    ((plain, _),) = TokenLayout.of(tok, 512).encode(tok, [rendered.removeprefix("<s>")], "left")
    assert plain == ids


def test_template_without_bos_is_left_alone(tok: Any) -> None:
    tok.chat_template = TEMPLATE.removeprefix("{{ bos_token }}")
    add_bos_on_encode(tok)
    rendered = render(tok, prompt="a", response="b")
    assert rendered == "<|user|>a</s><|assistant|>b</s>"
    ((ids, _),) = TokenLayout.of(tok, 512).encode(tok, [rendered], "left")
    assert ids == tok(rendered)["input_ids"] and ids.count(BOS_ID) == 1


def test_templates_take_every_role_and_tool_fields(tok: Any) -> None:
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}{% if m.tool_call_id %}:{{ m.tool_call_id }}"
        "{% endif %}]{{ m['content'] }}{% endfor %}"
    )
    chat = [
        {"role": "user", "content": "weather?"},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    assert render(tok, messages=chat) == "[user]weather?[tool:c1]sunny[assistant]It is sunny."


@pytest.mark.parametrize(
    ("prefix", "suffix", "content", "side", "want", "cut"),
    [
        ((), (), [5, 6, 7], "left", [5, 6, 7], False),
        ((1,), (), [5, 6, 7], "left", [1, 5, 6, 7], False),
        ((1,), (), [1, 5, 6, 7], "left", [1, 5, 6, 7], False),  # the text's own BOS kept once
        ((1,), (), [1, 1, 5], "left", [1, 1, 5], False),  # only one copy is taken as the prefix
        ((1,), (), [5, 6, 7, 8, 9], "left", [1, 7, 8, 9], True),
        ((1,), (), [1, 5, 6, 7, 8, 9], "left", [1, 7, 8, 9], True),  # BOS survives the cut
        ((1,), (), [5, 6, 7, 8, 9], "right", [1, 5, 6, 7], True),
        ((101,), (102,), [5, 6, 7, 8], "left", [101, 7, 8, 102], True),  # BERT's [CLS] .. [SEP]
        ((101,), (102,), [5, 6], "right", [101, 5, 6, 102], False),
    ],
)
def test_token_layout(
    prefix: tuple[int, ...],
    suffix: tuple[int, ...],
    content: list[int],
    side: str,
    want: list[int],
    cut: bool,
) -> None:
    assert TokenLayout(prefix, suffix, max_length=4).ids(content, side) == (want, cut)


def test_token_layout_needs_room_for_content() -> None:
    with pytest.raises(ValueError, match="max_length 2 leaves no room"):
        TokenLayout((101,), (102,), max_length=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one.*got none"),
        ({"text": "t", "messages": CHAT}, "text and messages"),
        ({"text": "t", "prompt": "p", "response": "r"}, "text and prompt/response"),
        ({"prompt": "p"}, "response is missing"),
        ({"response": "r"}, "prompt is missing"),
        ({"messages": []}, "messages is empty"),
        ({"messages": [{"role": "", "content": "x"}]}, r"messages\[0\]: role must be a non-empty"),
        ({"messages": [{"role": "user", "content": "x", "x": 1}]}, r"messages\[0\]: unknown keys"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\]: expected keys role and content"),
        ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\]: content is int"),
    ],
)
def test_bad_combinations(tok: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render(tok, **kwargs)
