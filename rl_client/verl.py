"""verl's custom reward hook, scored by a warm-serve endpoint through the reward client.

Point verl at this file (`reward.custom_reward_function.path=<this file>`) and name one of:
- `compute_score_batch`: the batch reward manager's signature, called with keyword lists
  `data_sources`, `solution_strs`, `ground_truths`, `extra_infos`; returns one float each;
- `compute_score`: the per-sample signature verl 0.9's reward loop awaits
  (`data_source`, `solution_str`, `ground_truth`, `extra_info`); returns one float.

verl hands the hook the response only: each sample's prompt comes from its `extra_info`
(`prompt`: a string, or a list of chat messages), which the dataset must carry. Client
settings come from verl's `reward_kwargs` (`base_url`, `api_key`, `timeout_s`,
`max_retries`, `max_concurrency`, `on_failure`, `expected_fingerprint`, ...: the fields
of `ClientConfig`), else from WARM_RL_REWARD_URL and WARM_RL_API_KEY. Requests are retried,
chunked to the server's limits and sent concurrently. verl has no "no reward" value: by
default a sample that fails every retry fails the step (`on_failure="raise"`); with
`on_failure="none"` it gets None.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from rl_client.client import AsyncRewardClient, ClientConfig, RewardClient
from service.protocol import Item, Message

PROMPT_KEYS = ("prompt", "raw_prompt")
_lock = threading.Lock()
_sync_clients: dict[ClientConfig, RewardClient] = {}
# Per event loop (an async client's connections belong to the loop that opened them).
_async_clients: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[ClientConfig, AsyncRewardClient]
] = weakref.WeakKeyDictionary()


def client_config(options: Mapping[str, Any]) -> ClientConfig:
    """The client's settings from verl's reward_kwargs (unknown keys are an error), with the
    URL and key from the environment when the kwargs do not give them."""
    fields = dict(options)
    fields.setdefault("base_url", os.environ.get("WARM_RL_REWARD_URL", "http://127.0.0.1:8000"))
    if "api_key" not in fields and os.environ.get("WARM_RL_API_KEY"):
        fields["api_key"] = os.environ["WARM_RL_API_KEY"]
    fields.setdefault("on_failure", "raise")
    return ClientConfig.model_validate(fields)


def sample_item(solution: str, extra_info: Mapping[str, Any] | None, index: int) -> Item:
    """A scoreable item: the sample's prompt (from extra_info) and its response."""
    info = extra_info or {}
    prompt = next((info[k] for k in PROMPT_KEYS if info.get(k) is not None), None)
    if prompt is None:
        raise ValueError(
            f"sample {index}: extra_info has no prompt (keys {sorted(info)}); verl passes the "
            "response only, so put the prompt in the dataset's extra_info['prompt'] (a string "
            "or a list of chat messages)"
        )
    if isinstance(prompt, str):
        return Item(prompt=prompt, response=solution)
    turns = [Message.model_validate(dict(turn)) for turn in prompt]
    return Item(messages=[*turns, Message(role="assistant", content=solution)])


def _items(solutions: Sequence[str], extra_infos: Sequence[Any] | None) -> list[Item]:
    infos = list(extra_infos) if extra_infos is not None else [None] * len(solutions)
    if len(infos) != len(solutions):
        raise ValueError(f"{len(solutions)} solution_strs but {len(infos)} extra_infos")
    pairs = enumerate(zip(solutions, infos, strict=True))
    return [sample_item(solution, info, i) for i, (solution, info) in pairs]


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Any] | None = None,
    **reward_kwargs: Any,
) -> list[float | None]:
    """verl's batch reward manager hook: one reward per solution, in order."""
    config = client_config(reward_kwargs)
    with _lock:
        client = _sync_clients.get(config)
        if client is None:
            client = _sync_clients[config] = RewardClient(config=config)
    return client.score(_items(solution_strs, extra_infos)).rewards


async def compute_score(
    data_source: Any = None,
    solution_str: str = "",
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> float | None:
    """verl's per-sample reward hook (awaited by verl 0.9's reward loop)."""
    # verl adds these two when its own reward model is enabled: not client settings.
    options = {
        k: v
        for k, v in kwargs.items()
        if k not in {"reward_router_address", "reward_model_tokenizer"}
    }
    config = client_config(options)
    clients = _async_clients.setdefault(asyncio.get_running_loop(), {})
    client = clients.get(config)
    if client is None:
        client = clients[config] = AsyncRewardClient(config=config)
    batch = await client.score([sample_item(solution_str, extra_info, 0)])
    return batch.rewards[0]
