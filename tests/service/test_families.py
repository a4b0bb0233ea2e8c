"""The decoder reward-model families users serve (Qwen2, Qwen3, Llama 3, Gemma 2, Mistral),
end to end: merged by `warm-merge build`, served over HTTP by both backends, scored equal to
a direct transformers forward of the same chat-template text, with exactly one BOS.

Tiny random models with the families' real classes, configs and tokenizer setups
(`families.py`): Llama 3 and Mistral have no pad token, as shipped, and end every turn with
an EOS, the case where transformers' pad-id pooling reads the wrong token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from families import FAMILIES, make_family_rm, tokenizer_of
from live import Live, live_server
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from merger.build import run_merge
from merger.config import MergeSpec
from merger.manifest import verify_artifact
from merger.plan import plan_merge
from merger.scoring import RewardForward, attention_implementation
from service.protocol import ScoreResponse
from service.settings import Settings

PROMPT = "why is the sky blue"
ANSWER = "rayleigh scattering explains the sky"
CHAT = [
    {"role": "system", "content": "helpful honest model"},
    {"role": "user", "content": PROMPT},
    {"role": "assistant", "content": ANSWER},
]
TOOL_CHAT = [
    {"role": "user", "content": "weather today"},
    {
        "role": "assistant",
        "content": "call function",
        "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"day": "today"}}}
        ],
    },
    {"role": "tool", "content": "sunny", "tool_call_id": "call0"},
    {"role": "assistant", "content": "the weather today is sunny"},
]
# Gemma's template refuses system turns (and so takes no tools): its chats start with a user.
NO_SYSTEM = {"gemma2"}
TAKES_TOOLS = {"llama3", "mistral", "qwen2", "qwen3"}
# vLLM with its defaults (the CPU KV cache sized for the model), eager for a quick start.
VLLM = {"backend": "vllm", "vllm_enforce_eager": True}
VLLM_TOLERANCE = 1e-5  # fp32: vLLM's CPU kernels agree with PyTorch's to this


def chat_for(family: str) -> list[dict[str, Any]]:
    """The test chat in a form the family's template takes."""
    return CHAT[1:] if family in NO_SYSTEM else CHAT


def reference_model(model_dir: Path) -> Any:
    """The model as transformers loads it by itself, fp32, with the attention kernel that
    computes the family's function (eager where logits are soft-capped)."""
    config = AutoConfig.from_pretrained(model_dir)
    return (
        AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=attention_implementation(config)
        )
        .float()
        .eval()
    )


def direct_reward(model: Any, ids: list[int]) -> float:
    """The reward of one unpadded sequence from a plain forward (its last token)."""
    with torch.inference_mode():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def template_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """`apply_chat_template(..., tokenize=True)`: the ids the template means."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@dataclass
class Merged:
    """A family's WARM artifacts (fp32 and bf16 members) and their members."""

    family: str
    fp32: Path
    bf16: Path


@pytest.fixture(scope="module", params=list(FAMILIES))
def merged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Merged:
    """Three members per dtype, merged by warm-merge build."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        members = [
            make_family_rm(root / f"{name}-m{i}", family, seed=10 + i, dtype=dtype)
            for i in range(3)
        ]
        out[name] = root / f"warm-{name}"
        run_merge(plan_merge(MergeSpec(inputs=tuple(members))), out[name])
    return Merged(family, out["fp32"], out["bf16"])


def test_merge_verifies_and_loads(merged: Merged) -> None:
    for artifact, dtype in ((merged.fp32, torch.float32), (merged.bf16, torch.bfloat16)):
        manifest = verify_artifact(artifact)
        assert len(manifest.merge.inputs) == 3
        model = AutoModelForSequenceClassification.from_pretrained(artifact)
        assert type(model).__name__ == FAMILIES[merged.family].model_class.__name__
        assert next(model.parameters()).dtype == dtype


@dataclass
class Served:
    """A family's fp32 artifact served by the transformers backend."""

    family: str
    model_dir: Path
    live: Live


@pytest.fixture(scope="module")
def served(merged: Merged) -> Iterator[Served]:
    """The fp32 artifact, served."""
    settings = Settings.model_validate({"model": merged.fp32})
    with live_server(settings) as live:
        yield Served(merged.family, merged.fp32, live)


def family_items(family: str) -> list[dict[str, Any]]:
    """A text, a prompt/response pair and a chat (and a tool chat where the template takes
    tools), plus a preformatted text that carries the template's BOS already."""
    tokenizer = tokenizer_of(family)
    chat = chat_for(family)
    items: list[dict[str, Any]] = [
        {"text": f"{PROMPT} {ANSWER}"},
        {"prompt": PROMPT, "response": ANSWER},
        {"messages": chat},
        {"text": tokenizer.apply_chat_template(chat, tokenize=False)},
    ]
    if family in TAKES_TOOLS:
        items.append({"messages": TOOL_CHAT})
    return items


def expected_ids(family: str, item: dict[str, Any]) -> list[int]:
    """The ids each item means: the template's for chats (one BOS, from the template), the
    tokenizer's own encoding for plain text."""
    tokenizer = tokenizer_of(family)
    if "messages" in item:
        return template_ids(tokenizer, item["messages"])
    if "prompt" in item:
        pair = [{"role": "user", "content": item["prompt"]}]
        return template_ids(tokenizer, [*pair, {"role": "assistant", "content": item["response"]}])
    text = item["text"]
    if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def test_rendering_is_the_template_with_one_bos(served: Served) -> None:
    family = served.family
    tokenizer = AutoTokenizer.from_pretrained(served.model_dir)
    encoder = served.live.state.serving().encoder
    for item in family_items(family):
        if "messages" in item:
            rendered = encoder.render_all([_item(item)])[0]
            assert rendered == tokenizer.apply_chat_template(item["messages"], tokenize=False)
        (encoded,) = encoder.encode([_item(item)], "left")
        assert encoded.ids == expected_ids(family, item), item
        if tokenizer.bos_token_id is not None and FAMILIES[family].adds_bos:
            assert encoded.ids[0] == tokenizer.bos_token_id
            assert encoded.ids.count(tokenizer.bos_token_id) == 1


def _item(body: dict[str, Any]) -> Any:
    from service.protocol import Item

    return Item.model_validate(body)


def test_scores_equal_a_direct_forward_of_the_template_ids(served: Served) -> None:
    items = family_items(served.family)
    with served.live.client() as client:
        response = client.post("/v1/score", json={"items": items})
    assert response.status_code == 200, response.text
    body = ScoreResponse.model_validate(response.json())
    model = reference_model(served.model_dir)
    for result, item in zip(body.results, items, strict=True):
        ids = expected_ids(served.family, item)
        assert result.n_tokens == len(ids)
        assert result.reward == pytest.approx(direct_reward(model, ids), abs=1e-5), item


def test_last_eos_is_the_token_scored(served: Served) -> None:
    """The reward is read at the template's closing EOS, not the token before it."""
    tokenizer = tokenizer_of(served.family)
    ids = template_ids(tokenizer, chat_for(served.family))
    model = reference_model(served.model_dir)
    with served.live.client() as client:
        got = client.post("/v1/score", json={"items": [{"messages": chat_for(served.family)}]})
    reward = got.json()["results"][0]["reward"]
    assert reward == pytest.approx(direct_reward(model, ids), abs=1e-5)
    before_last = direct_reward(model, ids[:-1])
    assert abs(reward - before_last) > 1e-3  # the two candidate tokens are distinguishable


def test_a_template_that_refuses_a_turn_is_a_422_naming_the_item(served: Served) -> None:
    if served.family in NO_SYSTEM:
        bad = {"messages": CHAT}  # Gemma: "System role not supported"
        want = "System role not supported"
    elif served.family == "mistral":
        bad = {"messages": [{"role": "critic", "content": "x"}]}
        want = "Unknown role: critic"
    else:
        return  # ChatML and Llama 3 templates render any role
    with served.live.client() as client:
        response = client.post("/v1/score", json={"items": [{"text": "ok"}, bad]})
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert message.startswith("items[1]: cannot render") and want in message


def test_bf16_members_merge_and_serve_in_fp32(merged: Merged) -> None:
    items = family_items(merged.family)[:3]
    settings = Settings.model_validate({"model": merged.bf16})
    with live_server(settings) as live, live.client() as client:
        card = client.get("/v1/models").json()["data"][0]
        body = client.post("/v1/score", json={"items": items}).json()
    assert card["dtype"] == "float32"
    model = reference_model(merged.bf16)  # the bf16 weights, upcast
    for result, item in zip(body["results"], items, strict=True):
        want = direct_reward(model, expected_ids(merged.family, item))
        assert result["reward"] == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pad_in_config", [True, False])
def test_last_token_pooling_with_padding(merged: Merged, side: str, pad_in_config: bool) -> None:
    tokenizer = tokenizer_of(merged.family)
    model = reference_model(merged.fp32)
    chat = chat_for(merged.family)
    rows = [template_ids(tokenizer, chat), template_ids(tokenizer, chat[:-1]), [5, 6, 7]]
    want = [direct_reward(model, row) for row in rows]
    # EOS as the filler, the case that misleads pad-id pooling; None where the family has none.
    filler = tokenizer.eos_token_id
    model.config.pad_token_id = filler if pad_in_config else None
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), filler)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(longest - len(row), longest) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    with torch.inference_mode():
        got = RewardForward(model)(ids, mask)[:, 0]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


@pytest.mark.vllm
def test_vllm_backend_scores_like_transformers(served: Served, needs_vllm: None) -> None:
    items = family_items(served.family)
    settings = Settings.model_validate({"model": served.model_dir, **VLLM})
    verl = {"input": template_text(served.family), "use_activation": False}
    with served.live.client() as client:
        want = client.post("/v1/score", json={"items": items}).json()["results"]
    with live_server(settings) as live, live.client() as client:
        got = client.post("/v1/score", json={"items": items}).json()["results"]
        classify = client.post("/classify", json=verl).json()["data"][0]["probs"][0]
    for a, b in zip(got, want, strict=True):
        assert a["n_tokens"] == b["n_tokens"]
        assert a["reward"] == pytest.approx(b["reward"], abs=VLLM_TOLERANCE)
    assert classify == pytest.approx(want[2]["reward"], abs=VLLM_TOLERANCE)  # the chat item


def template_text(family: str) -> str:
    """The family's chat rendered as verl sends it: the template's text, BOS removed."""
    tokenizer = tokenizer_of(family)
    text = tokenizer.apply_chat_template(chat_for(family), tokenize=False)
    bos = tokenizer.bos_token
    return text[len(bos) :] if bos and text.startswith(bos) else text
