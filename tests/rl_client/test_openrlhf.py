"""OpenRLHF's remote reward-model calls, replayed over real HTTP against a live warm-serve.

OpenRLHF (`--reward.remote_url`, formerly `--remote_rm_url`) posts JSON to /get_reward:
- newest (`SingleTurnAgentExecutor`, openrlhf/utils/agent.py): one sample per request,
  {"query": [prompt+response], "prompts": [prompt], "labels": [label]}, many at once, and
  reads `rewards`, `scores or rewards` and `extra_logs or {}` from the response dict;
- older (`request_api_wrapper`, openrlhf/utils/remote_rm_utils.py): a batch of queries and
  labels of any JSON type, and asserts "rewards" is in the response.

`query` is `tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False)`: the
policy's special tokens stay in the text, so the tests put them there too.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from live import Live, live_server
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from service.settings import Settings

WORDS = [
    *("the", "cat", "sat", "on", "a", "mat", "while", "my"),
    *("dog", "ran", "to", "the", "park", "and", "back", "again"),
]


def words(n: int, offset: int = 0) -> str:
    """A deterministic text of n words the tiny tokenizer knows."""
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


def sample(i: int) -> tuple[str, str]:
    """(prompt, query) of sample i, laid out like a decoded policy rollout with its EOS."""
    prompt = f"<s>Q: {words(3 + i % 5, i)}\nA:"
    return prompt, f"{prompt} {words(2 + i % 7, i + 3)}</s>"


@pytest.fixture(scope="module")
def rm(gpt2_rm: Path) -> Iterator[tuple[Live, Any, Any]]:
    """The tiny GPT-2 RM served live, with its tokenizer and model for direct forwards."""
    tokenizer = AutoTokenizer.from_pretrained(gpt2_rm)
    model = AutoModelForSequenceClassification.from_pretrained(gpt2_rm).eval()
    with live_server(Settings.model_validate({"model": gpt2_rm})) as live:
        yield live, tokenizer, model


def direct_reward(tokenizer: Any, model: Any, text: str) -> float:
    """The reward of `text` from a plain transformers forward (unpadded)."""
    with torch.inference_mode():
        enc = tokenizer(text, return_tensors="pt")
        return float(model(**enc).logits[0, 0])


def openrlhf_parse(response: httpx.Response) -> tuple[Any, Any, dict[str, Any]]:
    """Read a /get_reward response exactly as OpenRLHF's SingleTurnAgentExecutor does."""
    rewards_info = response.json()
    assert isinstance(rewards_info, dict)
    reward = rewards_info.get("rewards")
    scores = rewards_info.get("scores") or rewards_info.get("rewards")
    extra_logs = rewards_info.get("extra_logs") or {}
    return reward, scores, extra_logs


def test_concurrent_single_sample_requests_match_a_direct_forward(
    rm: tuple[Live, Any, Any],
) -> None:
    live, tokenizer, model = rm
    samples = [sample(i) for i in range(16)]
    url = f"{live.url}/get_reward"

    def call(prompt_query: tuple[str, str]) -> httpx.Response:
        prompt, query = prompt_query
        body = {"query": [query], "prompts": [prompt], "labels": [""]}
        return httpx.post(url, json=body, timeout=180)

    with ThreadPoolExecutor(max_workers=len(samples)) as pool:
        responses = list(pool.map(call, samples))

    for (_, query), response in zip(samples, responses, strict=True):
        assert response.status_code == 200, response.text
        reward, scores, extra_logs = openrlhf_parse(response)
        expected = direct_reward(tokenizer, model, query)
        assert reward == pytest.approx([expected], abs=1e-5)
        assert scores == reward
        n_tokens = len(tokenizer(query)["input_ids"])
        assert extra_logs == {"n_tokens": [float(n_tokens)], "truncated": [0.0]}


def test_older_batched_shape_with_labels_of_any_type(rm: tuple[Live, Any, Any]) -> None:
    live, tokenizer, model = rm
    samples = [sample(i) for i in range(5)]
    data = {
        "query": [q for _, q in samples],
        "prompts": [p for p, _ in samples],
        "labels": [3, None, 0.5, "B", {"answer": [1, 2]}],
    }
    # request_api_wrapper: requests.post(url, json=data, headers=..., timeout=180).
    response = httpx.post(
        f"{live.url}/get_reward",
        json=data,
        headers={"Content-Type": "application/json"},
        timeout=180,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "rewards" in body, f"rewards not in {body}"
    assert len(body["rewards"]) == len(data["query"])
    expected = [direct_reward(tokenizer, model, q) for q in data["query"]]
    assert body["rewards"] == pytest.approx(expected, abs=1e-5)
    assert len(body["scores"]) == len(body["extra_logs"]["n_tokens"]) == len(data["query"])


def test_special_tokens_in_the_query_are_scored_as_special_tokens(
    rm: tuple[Live, Any, Any],
) -> None:
    live, tokenizer, model = rm
    query = "<s>Q: the cat sat\nA: on a mat</s><pad>"
    ids = tokenizer(query)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert [tokenizer.eos_token_id, tokenizer.pad_token_id] == ids[-2:]
    body = {"query": [query], "prompts": ["<s>Q: the cat sat\nA:"], "labels": [""]}
    response = httpx.post(f"{live.url}/get_reward", json=body, timeout=180)
    assert response.status_code == 200, response.text
    reward, _, extra_logs = openrlhf_parse(response)
    # The reward is read at the query's last token, the literal <pad> included, as
    # OpenRLHF's own serve_rm reads it (the last attended position): a plain forward of the
    # unpadded query with no pad id to skip.
    model.config.pad_token_id = None
    try:
        want = direct_reward(tokenizer, model, query)
    finally:
        model.config.pad_token_id = tokenizer.pad_token_id
    assert reward == pytest.approx([want], abs=1e-5)
    assert extra_logs["n_tokens"] == [float(len(ids))]


def test_empty_query_is_rejected_with_the_error_envelope(rm: tuple[Live, Any, Any]) -> None:
    live, _, _ = rm
    body = {"query": [], "prompts": [], "labels": []}
    response = httpx.post(f"{live.url}/get_reward", json=body, timeout=180)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert isinstance(error["message"], str) and error["message"]
