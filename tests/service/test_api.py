"""The reward service over real HTTP: a real uvicorn server, tiny real GPT-2 and BERT RMs,
served by each backend (transformers, and vLLM's engine: tests marked `vllm`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from live import Live, live_server
from tiny_models import make_rm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from merger.build import run_merge
from merger.config import MergeSpec
from merger.formatting import render
from merger.plan import plan_merge
from service.protocol import GetRewardResponse, ModelList, RerankResponse, ScoreResponse
from service.settings import Settings

WORDS = [
    *("the", "cat", "sat", "on", "a", "mat", "while", "my"),
    *("dog", "ran", "to", "the", "park", "and", "back", "again"),
]


def text_of(n_words: int, offset: int = 0) -> str:
    """A deterministic text of n_words words from the tiny tokenizer's corpus."""
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n_words))


def direct_rewards(model_dir: Path, texts: list[str]) -> list[list[float]]:
    """Rewards from a plain transformers forward, one unpadded text at a time."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    with torch.inference_mode():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt")
            out.append(model(**enc).logits[0].tolist())
    return out


def settings_for(model: Path, **overrides: object) -> Settings:
    """Test settings: no environment, quick warm-up."""
    return Settings.model_validate({"model": model, **overrides})


# The API suite runs against both backends. vLLM's CPU attention needs head size 32, hence
# conftest's *_vllm variants of the tiny models; its kernels differ from PyTorch's by
# rounding, hence its looser tolerance against a direct transformers forward.
# The compiled variants run the same suite through torch.compile (Inductor), which must
# keep the same tolerance as eager PyTorch.
VLLM = {"backend": "vllm", "vllm_enforce_eager": True, "vllm_kv_cache_gib": 0.25}
COMPILED = {"compile": True}
SERVED = {  # id: (model fixture, backend settings, tolerance)
    "gpt2": ("gpt2_rm", {}, 1e-5),
    "bert": ("bert_rm", {}, 1e-5),
    "minilm": ("minilm_rm", {}, 1e-5),
    "gpt2-compiled": ("gpt2_rm", COMPILED, 1e-5),
    "bert-compiled": ("bert_rm", COMPILED, 1e-5),
    "gpt2-vllm": ("gpt2_rm_vllm", VLLM, 1e-4),
    "bert-vllm": ("bert_rm_vllm", VLLM, 1e-4),
    "minilm-vllm": ("minilm_rm", VLLM, 1e-4),
}


@dataclass
class Served:
    """A live server, the model directory it serves, and its tolerance against transformers."""

    live: Live
    model_dir: Path
    backend: str
    tol: float
    compiled: bool


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(name, marks=[pytest.mark.vllm] if "vllm" in name else []) for name in SERVED
    ],
)
def server(request: pytest.FixtureRequest) -> Iterator[Served]:
    """A live server per tiny architecture and backend."""
    fixture, overrides, tol = SERVED[request.param]
    backend = str(overrides.get("backend", "transformers"))
    if backend == "vllm":
        request.getfixturevalue("needs_vllm")
    model_dir: Path = request.getfixturevalue(fixture)
    with live_server(settings_for(model_dir, **overrides)) as live:
        yield Served(live, model_dir, backend, tol, bool(overrides.get("compile")))


MIXED_ITEMS = [
    {"text": text_of(3)},
    {"prompt": text_of(5, 1), "response": text_of(12, 2)},
    {"messages": [{"role": "user", "content": text_of(4)}, {"role": "assistant", "content": "ok"}]},
    {"text": text_of(40, 3)},
    {"text": "a"},
]


def rendered(model_dir: Path, item: dict[str, object]) -> str:
    """The text the service scores for a request item."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return render(tokenizer, **item)  # type: ignore[arg-type]


def test_scores_equal_a_direct_transformers_forward(server: Served) -> None:
    live, model_dir = server.live, server.model_dir
    with live.client() as client:
        response = client.post("/v1/score", json={"items": MIXED_ITEMS})
    assert response.status_code == 200, response.text
    body = ScoreResponse.model_validate(response.json())
    expected = direct_rewards(model_dir, [rendered(model_dir, item) for item in MIXED_ITEMS])
    assert [r.index for r in body.results] == list(range(len(MIXED_ITEMS)))
    for result, want in zip(body.results, expected, strict=True):
        assert result.reward == pytest.approx(want[0], abs=server.tol)
        assert result.rewards is None and not result.truncated
    assert body.model == model_dir.name
    assert body.usage.items == len(MIXED_ITEMS)
    assert body.usage.tokens == sum(r.n_tokens for r in body.results)


def test_an_item_alone_equals_the_same_item_in_mixed_batches(server: Served) -> None:
    live = server.live
    probe = {"prompt": text_of(6), "response": text_of(9, 4)}
    others = [{"text": text_of(n, n)} for n in (1, 2, 7, 30, 60, 15, 3, 44)]
    with live.client() as client:
        alone = client.post("/v1/score", json={"items": [probe]}).json()["results"][0]["reward"]
        for position in (0, 3, len(others)):
            items = [*others[:position], probe, *others[position:]]
            results = client.post("/v1/score", json={"items": items}).json()["results"]
            assert results[position]["reward"] == pytest.approx(alone, abs=server.tol)


def summed(samples: dict[str, float], name: str) -> float:
    """The sum of a metric's samples over all its labels."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


async def _concurrent_scores(url: str, bodies: list[dict[str, object]]) -> list[httpx.Response]:
    import asyncio

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.post("/v1/score", json=b) for b in bodies))


def test_concurrent_clients_share_batches_and_keep_their_rewards(
    server: Served,
) -> None:
    import asyncio

    live, model_dir = server.live, server.model_dir
    before = live.metrics()
    bodies: list[dict[str, object]] = [
        {"items": [{"text": text_of(5 + i % 17, i)}]} for i in range(48)
    ]
    responses = asyncio.run(_concurrent_scores(live.url, bodies))
    assert all(r.status_code == 200 for r in responses)
    texts = [b["items"][0]["text"] for b in bodies]  # type: ignore[index]
    expected = direct_rewards(model_dir, texts)
    for response, want in zip(responses, expected, strict=True):
        assert response.json()["results"][0]["reward"] == pytest.approx(want[0], abs=server.tol)
    after = live.metrics()
    scored = after["warm_items_scored_total"] - before.get("warm_items_scored_total", 0)
    assert scored == 48
    if server.backend == "vllm":  # vLLM's engine batches: its steps, from its own metrics
        steps = summed(after, "vllm:iteration_tokens_total_count") - summed(
            before, "vllm:iteration_tokens_total_count"
        )
        assert 0 < steps < 48, "48 concurrent single-item requests were never batched together"
        return
    batches = after["warm_batch_size_count"] - before.get("warm_batch_size_count", 0)
    items = after["warm_batch_size_sum"] - before.get("warm_batch_size_sum", 0)
    assert items == 48
    assert batches < 48, "48 concurrent single-item requests were never batched together"


def test_rerank_ranks_by_reward_with_group_advantages(server: Served) -> None:
    live = server.live
    prompt = text_of(4)
    candidates = [text_of(n, n) for n in (2, 9, 5, 14, 1)]
    with live.client() as client:
        ranked = client.post("/v1/rerank", json={"prompt": prompt, "candidates": candidates})
        pairs = [{"prompt": prompt, "response": c} for c in candidates]
        scores = client.post("/v1/score", json={"items": pairs}).json()["results"]
        top2 = client.post(
            "/v1/rerank", json={"prompt": prompt, "candidates": candidates, "top_k": 2}
        ).json()
        chat = client.post(
            "/v1/rerank",
            json={"messages": [{"role": "user", "content": prompt}], "candidates": candidates},
        ).json()
    assert ranked.status_code == 200, ranked.text
    body = RerankResponse.model_validate(ranked.json())
    rewards = [s["reward"] for s in scores]
    order = sorted(range(len(rewards)), key=lambda i: -rewards[i])
    assert [r.index for r in body.results] == order
    assert [r.rank for r in body.results] == list(range(len(candidates)))
    assert body.best_index == order[0]
    mean = float(np.mean(rewards))
    std = float(np.std(rewards, ddof=1))
    assert body.mean == pytest.approx(mean, abs=1e-6)
    assert body.std == pytest.approx(std, abs=1e-6)
    for result in body.results:
        assert result.reward == pytest.approx(rewards[result.index], abs=server.tol)
        assert result.advantage == pytest.approx((rewards[result.index] - mean) / std, abs=1e-4)
    assert [r["index"] for r in top2["results"]] == order[:2]
    assert top2["usage"]["items"] == len(candidates)
    # Without a chat template, [user, assistant] renders exactly like (prompt, response).
    assert [r["index"] for r in chat["results"]] == order


def test_get_reward_speaks_openrlhf_protocol(server: Served) -> None:
    live, model_dir = server.live, server.model_dir
    queries = [text_of(8), text_of(3, 5)]
    # OpenRLHF's remote RM call: {"query", "prompts", "labels"} -> reads "rewards".
    request = {"query": queries, "prompts": [text_of(2), text_of(1)], "labels": ["", ""]}
    with live.client() as client:
        response = client.post("/get_reward", json=request)
    assert response.status_code == 200, response.text
    body = GetRewardResponse.model_validate(response.json())
    expected = direct_rewards(model_dir, queries)
    assert body.rewards == pytest.approx([e[0] for e in expected], abs=server.tol)
    assert body.scores == body.rewards
    assert set(body.extra_logs) == {"n_tokens", "truncated"}


def test_models_describes_the_served_model(server: Served) -> None:
    live, model_dir = server.live, server.model_dir
    with live.client() as client:
        body = ModelList.model_validate(client.get("/v1/models").json())
    card = body.data[0]
    arch = "GPT2" if "gpt2" in model_dir.name else "Bert"
    limit = 512 if "minilm" in model_dir.name else 128
    assert card.architecture == f"{arch}ForSequenceClassification"
    assert card.id == model_dir.name and card.manifest is None
    assert len(card.fingerprint) == 64
    assert (card.dtype, card.device, card.backend, card.num_labels, card.compiled) == (
        "float32", "cpu", server.backend, 1, server.compiled,
    )  # fmt: skip
    assert card.max_length == limit and card.limits.max_tokens_per_item == limit
    assert card.limits.max_items_per_request == Settings().max_items_per_request


def test_truncation_honours_the_side_and_is_reported(gpt2_rm: Path) -> None:
    long_text = text_of(60)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_rm)
    full = tokenizer(long_text)["input_ids"]
    assert len(full) > 16
    with live_server(settings_for(gpt2_rm, max_length=16)) as live, live.client() as client:
        results = {}
        for side in ("left", "right"):
            body = {"items": [{"text": long_text}, {"text": "a cat"}], "truncation_side": side}
            results[side] = ScoreResponse.model_validate(client.post("/v1/score", json=body).json())
        default = client.post("/v1/score", json={"items": [{"text": long_text}]}).json()
    model = AutoModelForSequenceClassification.from_pretrained(gpt2_rm).eval()
    with torch.inference_mode():
        kept = {"left": full[-16:], "right": full[:16]}
        for side, ids in kept.items():
            want = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
            long, short = results[side].results
            assert (long.n_tokens, long.truncated) == (16, True)
            assert not short.truncated
            assert long.reward == pytest.approx(want, abs=1e-5)
            assert results[side].usage.truncated_items == 1
    assert results["left"].results[0].reward != pytest.approx(results["right"].results[0].reward)
    # The server's default side is left: the response end is what a reward model scores.
    assert default["results"][0]["reward"] == pytest.approx(results["left"].results[0].reward)


def test_chat_template_renders_messages_without_double_bos(
    tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    model_dir = make_rm(tmp_path / "chat", "llama", seed=3, tokenizer_dir=tiny_tokenizer_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    )
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "user", "content": text_of(4)}, {"role": "assistant", "content": "ok"}]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    with live_server(settings_for(model_dir)) as live, live.client() as client:
        pair = {"prompt": messages[0]["content"], "response": messages[1]["content"]}
        body = client.post("/v1/score", json={"items": [{"messages": messages}, pair]}).json()
        card = client.get("/v1/models").json()["data"][0]
    assert card["chat_template"] is True
    want = direct_rewards(model_dir, [text])[0][0]
    assert body["results"][0]["reward"] == pytest.approx(want, abs=1e-5)
    assert body["results"][1]["reward"] == pytest.approx(want, abs=1e-5)


def test_multi_head_models_return_every_output(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    model_dir = make_rm(
        tmp_path / "multi", "bert", seed=5, num_labels=3, tokenizer_dir=tiny_tokenizer_dir
    )
    want = direct_rewards(model_dir, [text_of(7)])[0]
    for index in (0, 2):
        settings = settings_for(model_dir, reward_index=index)
        with live_server(settings) as live, live.client() as client:
            result = client.post("/v1/score", json={"items": [{"text": text_of(7)}]}).json()
        scored = result["results"][0]
        assert scored["rewards"] == pytest.approx(want, abs=1e-5)
        assert scored["reward"] == pytest.approx(want[index], abs=1e-5)


def test_a_warm_artifact_reports_its_fingerprint_and_provenance(
    tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    members = [
        make_rm(tmp_path / f"m{i}", "gpt2", seed=20 + i, tokenizer_dir=tiny_tokenizer_dir)
        for i in range(2)
    ]
    out = tmp_path / "warm"
    manifest = run_merge(plan_merge(MergeSpec(inputs=tuple(members))), out)
    with live_server(settings_for(out, model_id="warm-test")) as live, live.client() as client:
        card = client.get("/v1/models").json()["data"][0]
        metrics = live.metrics()
    assert card["id"] == "warm-test"
    assert card["fingerprint"] == manifest.fingerprint
    assert card["manifest"]["method"] == "average"
    assert len(card["manifest"]["inputs"]) == 2
    info = [k for k in metrics if k.startswith("warm_model_info{")]
    assert info and f'fingerprint="{manifest.fingerprint}"' in info[0]


def test_a_model_that_cannot_load_keeps_health_up_and_ready_down(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    with live_server(settings_for(broken), ready=False) as live, live.client() as client:
        assert client.get("/health").json() == {"status": "ok"}
        ready = client.get("/ready")
        scored = client.post("/v1/score", json={"items": [{"text": "a"}]})
    assert ready.status_code == 503 and ready.json()["error"]["type"] == "not_ready"
    assert "no config.json" in ready.json()["error"]["message"]
    assert scored.status_code == 503 and "Retry-After" in scored.headers


def test_refuses_pickled_checkpoints(tmp_path: Path, gpt2_rm: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(gpt2_rm, pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with live_server(settings_for(pickled), ready=False) as live, live.client() as client:
        message = client.get("/ready").json()["error"]["message"]
    assert "no *.safetensors" in message and "pickled" in message


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sixteen_bit_serving_is_a_sixteen_bit_trunk_under_an_fp32_head(
    gpt2_rm: Path, dtype: str
) -> None:
    text = text_of(11)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_rm)
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForSequenceClassification.from_pretrained(gpt2_rm, dtype=torch_dtype).eval()
    head = AutoModelForSequenceClassification.from_pretrained(gpt2_rm).score  # fp32, as saved
    with torch.inference_mode():
        hidden = model.transformer(**tokenizer(text, return_tensors="pt")).last_hidden_state
        want = head(hidden[0, -1].float()).item()  # the 16-bit trunk, the fp32 head
        sixteen_bit_head = model.score(hidden[0, -1]).item()
        fp32 = direct_rewards(gpt2_rm, [text])[0][0]
    with live_server(settings_for(gpt2_rm, dtype=dtype)) as live, live.client() as client:
        card = client.get("/v1/models").json()["data"][0]
        got = client.post("/v1/score", json={"items": [{"text": text}]}).json()
    assert card["dtype"] == dtype
    assert got["results"][0]["reward"] == pytest.approx(want, abs=1e-6)
    assert want != sixteen_bit_head  # a 16-bit head would fail the line above
    assert want != fp32  # the trunk really ran in 16 bits
