"""Best-of-N against a live reward service: ranking given candidates, and generate -> rank."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from live import Live
from toy_rl import save_toy_policy
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl_client.best_of_n import BestOfN, best_of_n, generate_candidates
from rl_client.client import RewardClient

GOOD = "aeiou"


@pytest.fixture
def client(rm_server: Live) -> Iterator[RewardClient]:
    """A reward client of the live server, closed after the test."""
    with RewardClient(rm_server.url) as c:
        yield c


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """The tiny random GPT-2 policy and its char tokenizer."""
    path = save_toy_policy(tmp_path_factory.mktemp("policy"), seed=0)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_best_of_n_ranks_given_candidates(client: RewardClient) -> None:
    [result] = best_of_n(client, ["say"], [["crab", "banana", "dog"]])
    assert result.prompt == "say"
    assert result.candidates == ["crab", "banana", "dog"]
    assert result.rewards == [-1.0, 1.0, -1.0]
    assert result.best_index == 1
    assert result.best == "banana"
    # mean -1/3; deviations -2/3, 4/3, -2/3; sample variance (4/9+16/9+4/9)/2 = 4/3,
    # std 2/sqrt(3) = 1.1547; advantages -1/sqrt(3) = -0.57735 and 2/sqrt(3) = 1.1547.
    assert result.advantages == pytest.approx([-0.5773503, 1.1547005, -0.5773503], abs=1e-5)
    assert json.loads(json.dumps(result.to_json())) == {
        "prompt": "say",
        "candidates": ["crab", "banana", "dog"],
        "rewards": [-1.0, 1.0, -1.0],
        "best_index": 1,
        "best": "banana",
        "advantages": result.advantages,
    }


def test_best_of_n_keeps_prompt_and_candidate_order(client: RewardClient) -> None:
    prompts = ["p0", "p1", "p2", "p3"]
    candidates = [["xyz", "tea"], ["mop", "hat", "shoe"], ["k"], ["zip", "zap"]]
    results = best_of_n(client, prompts, candidates)
    assert [r.prompt for r in results] == prompts
    assert [r.candidates for r in results] == candidates
    assert [r.rewards for r in results] == [[-1, 1], [-1, -1, 1], [-1], [-1, -1]]
    # Ties keep request order; a single candidate, or all tied, has zero std: advantages 0.
    assert [r.best_index for r in results] == [1, 2, 0, 0]
    assert [r.best for r in results] == ["tea", "shoe", "k", "zip"]
    assert results[2].advantages == [0.0]
    assert results[3].advantages == [0.0, 0.0]
    # Two candidates at +-1: mean 0, sample std sqrt(2), advantages -+1/sqrt(2).
    assert results[0].advantages == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])


def test_best_of_n_validates_its_inputs(client: RewardClient) -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 candidate lists"):
        best_of_n(client, ["a", "b"], [["x"]])
    with pytest.raises(ValueError, match=r"candidates\[1\] is empty"):
        best_of_n(client, ["a", "b"], [["x"], []])
    with pytest.raises(ValueError, match=r"candidates\[0\] is a string"):
        best_of_n(client, ["a"], ["banana"])
    assert best_of_n(client, [], []) == []


def test_generate_candidates_is_reproducible(policy: tuple[Any, Any]) -> None:
    model, tokenizer = policy
    prompts = ["abc", "hello", "the"]
    first = generate_candidates(
        model, tokenizer, prompts, 4, max_new_tokens=6, batch_size=2, seed=7
    )
    assert len(first) == len(prompts)
    assert all(len(group) == 4 and all(isinstance(c, str) for c in group) for group in first)
    # New text only: 6 char tokens at most, never the prompt echoed back.
    assert all(len(c) <= 6 for group in first for c in group)
    again = generate_candidates(
        model, tokenizer, prompts, 4, max_new_tokens=6, batch_size=2, seed=7
    )
    assert again == first
    assert tokenizer.padding_side == "right"  # the caller's tokenizer is left as it was
    with pytest.raises(ValueError, match="n must be at least 1"):
        generate_candidates(model, tokenizer, prompts, 0)


def test_generate_then_best_of_n(policy: tuple[Any, Any], client: RewardClient) -> None:
    model, tokenizer = policy
    prompts = ["abc", "hello", "the", "say"]
    candidates = generate_candidates(model, tokenizer, prompts, 6, max_new_tokens=6, seed=0)
    results = best_of_n(client, prompts, candidates)
    assert all(isinstance(r, BestOfN) for r in results)
    for prompt, group, result in zip(prompts, candidates, results, strict=True):
        assert result.prompt == prompt
        assert result.candidates == group
        assert result.best == group[result.best_index]
        assert result.rewards[result.best_index] == max(result.rewards)
        assert set(result.rewards) <= {-1.0, 1.0}
