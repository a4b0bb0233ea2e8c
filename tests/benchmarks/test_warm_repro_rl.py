"""The WARM reproduction's RL parts (benchmarks/warm_repro): the policy's word tokenizer, the
cached SFT policy, and the oracle served over real HTTP to the unchanged client and trainer."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "warm_repro"))

import oracle_server
import policy

from merger.recipe import prefdata
from rl_client.client import RewardClient
from rl_client.config import TrainConfig
from rl_client.errors import RequestFailed
from rl_client.rollout import read_prompts, sample
from rl_client.trainer import train
from service.loopback import serve

COOK = "How should I get started with baking bread?"
OVEN = "Preheat the oven fully before you bake anything."
SALT = "Salt the water well before you boil pasta."
PACK = "Pack light so your luggage stays easy to carry."
SILLY = "That is a silly question."
TINY = {"n_pairs": 16, "epochs": 1, "n_layer": 1, "n_embd": 32, "n_head": 2}


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A policy trained for one step: enough to load and sample, in about a second."""
    return policy.make_policy(tmp_path_factory.mktemp("policy") / "sft", **TINY, log=print)


@pytest.fixture(scope="module")
def oracle_url() -> Iterator[str]:
    with serve(oracle_server.create_oracle_app("oracle-test")) as url:
        yield url


@pytest.mark.parametrize("split", prefdata.SPLITS)
def test_tokenizer_round_trip_keeps_oracle_and_features(split: str) -> None:
    tokenizer = policy.word_tokenizer()
    for pair in prefdata.generate(split, 300, seed=7):
        prompt_ids = tokenizer(pair.prompt)["input_ids"]
        assert prompt_ids[0] == policy.BOS_ID
        assert prefdata.prompt_topic(tokenizer.decode(prompt_ids, skip_special_tokens=True)) == (
            prefdata.prompt_topic(pair.prompt)
        )
        for response in (pair.chosen, pair.rejected):
            ids = tokenizer(response, add_special_tokens=False)["input_ids"]
            assert policy.UNK_ID not in ids and policy.UNK_ID not in prompt_ids
            decoded = tokenizer.decode(ids, skip_special_tokens=True)
            assert prefdata.oracle(pair.prompt, decoded) == prefdata.oracle(pair.prompt, response)
            assert prefdata.features(pair.prompt, decoded) == (
                prefdata.features(pair.prompt, response)
            )
            assert decoded == response.lower()  # natural spacing: only the case changes


def test_tokenizer_spacing_and_unknown_words() -> None:
    tokenizer = policy.word_tokenizer()
    ids = tokenizer("Certainly!  Honestly, figure it out yourself.")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[:4] == [
        "<s>",
        "\u2581certainly",
        "!",
        "\u2581honestly",
    ]
    assert tokenizer.decode(ids, skip_special_tokens=True) == (
        "certainly! honestly, figure it out yourself."
    )
    assert tokenizer("zebra")["input_ids"] == [policy.BOS_ID, policy.UNK_ID]


def test_policy_loads_and_samples_with_the_rl_rollout(tiny_policy: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy).eval()
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == policy.EOS_ID
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id == policy.PAD_ID
    assert model.config.n_positions == policy.N_POSITIONS
    torch.manual_seed(0)
    prompts = prefdata.sample_prompts(2, seed=1)
    rollout = sample(model, tokenizer, prompts, 3, max_new_tokens=8, temperature=1.0)
    assert len(rollout.completions) == 6
    assert rollout.completion_ids.shape[0] == 6 and rollout.completion_ids.shape[1] <= 8
    assert all(isinstance(c, str) for c in rollout.completions)
    assert [i.prompt for i in rollout.items()] == [p for p in prompts for _ in range(3)]


def test_policy_is_cached_by_its_settings(tiny_policy: Path) -> None:
    weights = tiny_policy / "model.safetensors"
    before = weights.stat().st_mtime_ns
    messages: list[str] = []
    assert policy.make_policy(tiny_policy, **TINY, log=messages.append) == tiny_policy
    assert messages == [f"policy: reusing {tiny_policy}"]  # no training step logged
    assert weights.stat().st_mtime_ns == before
    record = json.loads((tiny_policy / policy.KEY_FILE).read_text())
    assert record["settings"]["n_pairs"] == TINY["n_pairs"]
    # Another setting retrains and replaces the directory whole; nothing is left beside it.
    messages.clear()
    policy.make_policy(tiny_policy, **{**TINY, "seed": 1}, log=messages.append)
    assert any("trained in" in m for m in messages)
    assert json.loads((tiny_policy / policy.KEY_FILE).read_text())["settings"]["seed"] == 1
    assert sorted(p.name for p in tiny_policy.parent.iterdir()) == ["sft"]
    policy.make_policy(tiny_policy, **TINY, log=messages.append)  # back, for other tests


def test_write_prompts_round_trips_through_the_trainers_reader(tmp_path: Path) -> None:
    path = policy.write_prompts(tmp_path / "prompts.jsonl", 5, seed=3, split="ood")
    assert read_prompts(path) == prefdata.sample_prompts(5, 3, "ood")


def test_oracle_endpoint_scores_exactly_the_oracle(oracle_url: str) -> None:
    # By hand: OVEN (oven, bake) and SALT (salt, boil, pasta) are informative cooking
    # sentences (+1 each), PACK is travel advice (-1), SILLY is rude (-2): 2 - 1 - 2 = -1.
    by_hand = f"Certainly! {OVEN} {SALT} {PACK} {SILLY}"
    pairs = [
        (COOK, by_hand),
        (COOK, f"{OVEN} {OVEN}"),  # distinct sentences only: 1
        (COOK, ""),  # nothing to read: 0
        ("Any advice on running?", "Warm up for five minutes before every run."),
        ("Hello there?", SILLY),  # a prompt without topic: only rudeness counts
    ]
    items = [{"prompt": p, "response": r} for p, r in pairs]
    with RewardClient(oracle_url) as client:
        card = client.models()
        batch = client.score(items)
    assert card.id == "oracle-test" and card.fingerprint == oracle_server.fingerprint()
    assert batch.model == "oracle-test"
    assert batch.rewards == [prefdata.oracle(p, r) for p, r in pairs]
    assert batch.rewards == [-1.0, 1.0, 0.0, 1.0, -2.0]
    first = batch.results[0]
    assert first is not None and not first.truncated
    assert first.n_tokens == len(prefdata.tokenize(COOK)) + len(prefdata.tokenize(by_hand))


def test_oracle_endpoint_refuses_items_without_a_prompt(oracle_url: str) -> None:
    body = {"items": [{"prompt": COOK, "response": OVEN}, {"text": OVEN}]}
    response = httpx.post(f"{oracle_url}/v1/score", json=body, timeout=10)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and "items[1]" in error["message"]
    chat = {"items": [{"messages": [{"role": "user", "content": COOK}]}]}
    assert httpx.post(f"{oracle_url}/v1/score", json=chat, timeout=10).status_code == 422
    malformed = httpx.post(f"{oracle_url}/v1/score", json={"items": []}, timeout=10)
    assert malformed.status_code == 422
    assert malformed.json()["error"]["type"] == "invalid_request"
    assert httpx.get(f"{oracle_url}/nowhere", timeout=10).json()["error"]["type"] == "not_found"
    assert httpx.get(f"{oracle_url}/health", timeout=10).json() == {"status": "ok"}
    with RewardClient(oracle_url) as client, pytest.raises(RequestFailed) as failed:
        client.score([OVEN])
    assert failed.value.status == 422 and failed.value.type == "invalid_request"


def test_trainer_runs_against_the_oracle_and_logs_it_as_control(
    tiny_policy: Path, oracle_url: str, tmp_path: Path
) -> None:
    prompts = policy.write_prompts(tmp_path / "prompts.jsonl", 4, seed=0)
    cfg = TrainConfig(
        policy=tiny_policy,
        prompts=prompts,
        reward_url=oracle_url,
        control_url=oracle_url,
        steps=2,
        prompts_per_step=2,
        group_size=2,
        max_new_tokens=16,
        out=tmp_path / "run",
        device="cpu",
        console=False,
    )
    with policy.torch_threads(1):
        history = train(cfg)
    logged = [
        json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in logged] == [1, 2] and len(history) == 2
    for record in logged:
        assert record["missing_rewards"] == 0
        assert record["control_reward"] == record["reward"]
