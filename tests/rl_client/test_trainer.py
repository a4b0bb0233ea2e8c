"""`warm-rl train`: its pure helpers, a smoke run that learns, and exact checkpoint resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from live import Live
from safetensors.torch import load_file
from toy_rl import EOS_ID, save_toy_policy

from rl_client.config import TrainConfig
from rl_client.rollout import DEFAULT_PROMPTS, completion_mask, prompt_batch, read_prompts
from rl_client.trainer import train

GOOD = "aeiou"  # the reward model pays +1 for a completion that ends in a vowel, else -1


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 policy over the character vocabulary."""
    return save_toy_policy(tmp_path_factory.mktemp("policy"), seed=0)


def config(policy: Path, url: str, out: Path, **overrides: Any) -> TrainConfig:
    """A small, fast run on the toy policy."""
    values: dict[str, Any] = {
        "policy": policy,
        "reward_url": url,
        "out": out,
        "prompts_per_step": 4,
        "group_size": 8,
        "max_new_tokens": 4,
        "lr": 3e-3,
        "kl_coef": 0.003,
        "console": False,
        "device": "cpu",
    }
    return TrainConfig.model_validate(values | overrides)


def test_completion_mask_stops_after_the_first_eos() -> None:
    tokens = torch.tensor([[5, 6, 1, 3], [1, 3, 3, 3], [5, 6, 7, 8]])
    expected = torch.tensor(
        [[True, True, True, False], [True, False, False, False], [True, True, True, True]]
    )
    assert torch.equal(completion_mask(tokens, eos_id=1), expected)
    assert completion_mask(tokens, eos_id=None).all()


def test_prompt_batches_cover_each_epoch_and_depend_on_the_step_only() -> None:
    epoch = prompt_batch(10, 0, 5, seed=3) + prompt_batch(10, 1, 5, seed=3)
    assert sorted(epoch) == list(range(10))
    assert prompt_batch(10, 1, 5, seed=3) == epoch[5:]
    assert sorted(prompt_batch(10, 2, 5, seed=3) + prompt_batch(10, 3, 5, seed=3)) == list(
        range(10)
    )
    assert prompt_batch(10, 0, 5, seed=4) != epoch[:5]
    # A batch larger than the prompt set spans epochs.
    assert len(prompt_batch(3, 0, 7, seed=0)) == 7


def test_read_prompts(tmp_path: Path) -> None:
    assert read_prompts(None) == DEFAULT_PROMPTS
    text = tmp_path / "p.txt"
    text.write_text("first\n\nsecond\n")
    assert read_prompts(text) == ["first", "second"]
    jsonl = tmp_path / "p.jsonl"
    chat = [{"role": "user", "content": "hi"}]
    jsonl.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"messages": chat}) + "\n")
    assert read_prompts(jsonl) == ["a", chat]
    jsonl.write_text(json.dumps({"question": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: expected a 'prompt' string"):
        read_prompts(jsonl)


def test_rloo_needs_groups(policy_dir: Path, tmp_path: Path) -> None:
    cfg = config(policy_dir, "http://127.0.0.1:1", tmp_path, group_size=1)
    with pytest.raises(ValueError, match="group_size >= 2"):
        train(cfg)


def test_the_policy_learns_the_served_reward(
    rm_server: Live, policy_dir: Path, tmp_path: Path
) -> None:
    cfg = config(policy_dir, rm_server.url, tmp_path / "run", steps=30, prompts_per_step=4)
    history = train(cfg)
    assert len(history) == 30
    first = sum(r["reward"] for r in history[:5]) / 5
    last = sum(r["reward"] for r in history[-5:]) / 5
    assert last > first + 0.5, f"mean reward went from {first:.2f} to {last:.2f}"
    for record in history:
        assert -1.0 <= record["reward"] <= 1.0
        assert record["length"] <= 4
        assert record["missing_rewards"] == 0
    # The log file holds the same records; the final policy differs from the initial one.
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert [r["step"] for r in logged] == list(range(1, 31))
    before = load_file(policy_dir / "model.safetensors")
    after = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed, "no parameter changed"


def test_resume_continues_exactly(rm_server: Live, policy_dir: Path, tmp_path: Path) -> None:
    straight = train(config(policy_dir, rm_server.url, tmp_path / "a", steps=4, save_every=2))
    first = train(config(policy_dir, rm_server.url, tmp_path / "b", steps=2))
    resumed = train(config(policy_dir, rm_server.url, tmp_path / "b", steps=4))
    volatile = {"reward_s", "reward_wait_s", "sample_s", "step_s"}

    def stable(records: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: v for k, v in r.items() if k not in volatile} for r in records]

    assert stable(resumed) == stable(straight)
    assert stable(first) == stable(straight[:2])
    a = load_file(tmp_path / "a" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)
    logged = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == [1, 2, 3, 4]


def test_eos_ends_a_completion(policy_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl_client.rollout import sample

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    vocab = policy.config.vocab_size
    head = torch.nn.Linear(policy.config.n_embd, vocab, bias=True)
    with torch.no_grad():  # a head that always says EOS
        head.weight.zero_()
        head.bias.copy_(torch.where(torch.arange(vocab) == EOS_ID, 100.0, 0.0))
    policy.lm_head = head
    rollout = sample(policy, tokenizer, ["abc", "hello there"], 3, max_new_tokens=5, temperature=1)
    assert rollout.completions == [""] * 6
    assert rollout.mask[:, 0].all() and not rollout.mask[:, 1:].any()
    assert rollout.items()[0].prompt == "abc"
    assert rollout.items()[3].prompt == "hello there"


def test_control_reward_is_logged_not_optimised(
    rm_server: Live, policy_dir: Path, tmp_path: Path
) -> None:
    # The same RM as control: its logged mean must equal the optimised reward's, step by step.
    cfg = config(policy_dir, rm_server.url, tmp_path, steps=2, control_url=rm_server.url)
    history = train(cfg)
    assert [r["control_reward"] for r in history] == [r["reward"] for r in history]
    without = train(config(policy_dir, rm_server.url, tmp_path / "plain", steps=2))
    assert "control_reward" not in without[0]
    assert [r["reward"] for r in without] == [r["reward"] for r in history]


def test_the_reward_clients_settings_are_flags(policy_dir: Path, tmp_path: Path) -> None:
    values: dict[str, Any] = {
        "policy": policy_dir,
        "out": tmp_path,
        "reward_url": "http://rm:8000",
        "api_key": "k",
        "reward_timeout_s": 9,
        "reward_max_retries": 0,
        "reward_backoff_base_s": 0.1,
        "reward_backoff_max_s": 2,
        "reward_max_concurrency": 3,
        "on_reward_failure": "none",
    }
    client = TrainConfig.model_validate(values).client_config()
    assert (client.base_url, client.timeout_s, client.max_retries) == ("http://rm:8000", 9, 0)
    assert (client.backoff_base_s, client.backoff_max_s, client.max_concurrency) == (0.1, 2, 3)
    assert client.on_failure == "none" and client.api_key is not None
    assert client.api_key.get_secret_value() == "k"
    # The flag's earlier word still works, and means the client's "none".
    older = TrainConfig.model_validate({**values, "on_reward_failure": "skip"})
    assert older.client_config().on_failure == "none"
    defaults = TrainConfig.model_validate({"policy": policy_dir}).client_config()
    assert defaults.max_retries == 6 and defaults.on_failure == "raise"
