"""TRL's GRPOTrainer trains a tiny policy on rewards from a live warm-serve endpoint."""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from live import Live
from toy_rl import save_toy_policy
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from rl_client.adapters import trl_items
from rl_client.client import AsyncRewardClient, RewardClient
from service.protocol import Item

GOOD = "aeiou"


def test_trl_items_plain_and_conversational() -> None:
    assert trl_items(["Q: hi"], [" there"]) == [Item(prompt="Q: hi", response=" there")]
    chat = trl_items(
        [[{"role": "user", "content": "hi"}]], [[{"role": "assistant", "content": "yo"}]]
    )
    assert chat[0].messages is not None
    assert [(m.role, m.content) for m in chat[0].messages] == [("user", "hi"), ("assistant", "yo")]
    with pytest.raises(ValueError, match="1 prompts but 2 completions"):
        trl_items(["a"], ["b", "c"])
    with pytest.raises(ValueError, match=r"prompts\[0\]: message content must be a string"):
        trl_items([[{"role": "user", "content": [{"type": "image"}]}]], [[]])


def test_reward_funcs_follow_trls_contract(rm_server: Live) -> None:
    prompts = ["say a", "say b", [{"role": "user", "content": "hi"}]]
    completions = ["banana", "crab", [{"role": "assistant", "content": "hello"}]]
    sync = RewardClient(rm_server.url).as_trl_reward_func()
    # TRL pickles reward functions into worker processes: the callable must survive it.
    sync = pickle.loads(pickle.dumps(sync))
    assert sync.__name__ == "warm_rm"
    kwargs = {"trainer_state": None, "completion_ids": [[1], [2], [3]], "extra_column": [1, 2, 3]}
    assert sync(prompts=prompts, completions=completions, **kwargs) == [1.0, -1.0, 1.0]

    afunc = pickle.loads(pickle.dumps(AsyncRewardClient(rm_server.url).as_trl_reward_func()))
    result = asyncio.run(afunc(prompts=prompts, completions=completions, **kwargs))
    assert result == [1.0, -1.0, 1.0]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_grpo_trainer_learns_from_the_service(
    rm_server: Live, tmp_path: Path, asynchronous: bool
) -> None:
    policy_dir = save_toy_policy(tmp_path / "policy", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    client: RewardClient | AsyncRewardClient = (
        AsyncRewardClient(rm_server.url) if asynchronous else RewardClient(rm_server.url)
    )
    scored_before = rm_server.metrics()["warm_items_scored_total"]
    steps, batch = 3, 8
    config = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=batch,
        num_generations=4,
        max_completion_length=6,
        max_steps=steps,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    prompts = Dataset.from_dict({"prompt": ["abc", "hello", "the", "say"] * 4})
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[client.as_trl_reward_func()],
        args=config,
        train_dataset=prompts,
        processing_class=tokenizer,
    )
    trainer.train()

    logged = [h for h in trainer.state.log_history if "rewards/warm_rm/mean" in h]
    assert len(logged) == steps
    # Every reward is +1 or -1 from the service: the logged means are means of those.
    for entry in logged:
        assert -1.0 <= entry["rewards/warm_rm/mean"] <= 1.0
    scored = rm_server.metrics()["warm_items_scored_total"] - scored_before
    assert scored == steps * batch
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "no parameter changed after training"
