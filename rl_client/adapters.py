"""Reward functions in the shapes trainers expect, backed by a warm-serve endpoint.

TRL: `GRPOTrainer` / `RLOOTrainer` call each `reward_funcs` entry as
`f(prompts=..., completions=..., completion_ids=..., **kwargs) -> list[float | None]`, with
plain strings or, for conversational data, lists of `{"role", "content"}` messages. `None`
is TRL's "no reward for this sample" (the client's `on_failure="none"`); a failed call is
never turned into a reward of 0 here.

OpenRLHF needs no adapter: point `--reward.remote_url` at the service's `/get_reward`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rl_client.client import AsyncRewardClient, ClientConfig, RewardClient
from service.protocol import Item, Message

Conversation = Sequence[Mapping[str, Any]]


def _messages(turns: Conversation, where: str) -> list[Message]:
    messages = []
    for turn in turns:
        content = turn.get("content")
        if not isinstance(content, str):
            raise ValueError(
                f"{where}: message content must be a string (multimodal parts are not scored)"
            )
        messages.append(Message(role=turn["role"], content=content))
    return messages


def trl_items(prompts: Sequence[Any], completions: Sequence[Any]) -> list[Item]:
    """Scoreable items from TRL's prompts and completions, plain text or conversational."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    items = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if isinstance(prompt, str) and isinstance(completion, str):
            items.append(Item(prompt=prompt, response=completion))
        elif isinstance(prompt, str):
            raise ValueError(f"completions[{i}]: expected a string after a string prompt")
        else:
            chat = _messages(prompt, f"prompts[{i}]") + _messages(completion, f"completions[{i}]")
            items.append(Item(messages=chat))
    return items


class _RewardFunc:
    """What both forms share: a name TRL logs under, and pickling as the client config."""

    def __init__(self, config: ClientConfig, name: str = "warm_rm") -> None:
        self.config = config
        self.__name__ = name  # TRL logs each reward function under its name

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "__name__": self.__name__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"], state["__name__"])  # type: ignore[misc]


class TRLRewardFunc(_RewardFunc):
    """A synchronous TRL reward function; pickles as its client configuration."""

    _client: RewardClient | None = None

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """One reward per completion, `None` where the service gave none."""
        if self._client is None:
            self._client = RewardClient(config=self.config)
        return self._client.score(trl_items(prompts, completions)).rewards


class AsyncTRLRewardFunc(_RewardFunc):
    """An async TRL reward function (TRL gathers async functions concurrently)."""

    _client: AsyncRewardClient | None = None

    async def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """One reward per completion, `None` where the service gave none."""
        # TRL runs async reward functions on one daemon event loop: the client's connection
        # pool is created on first use inside it.
        if self._client is None:
            self._client = AsyncRewardClient(config=self.config)
        batch = await self._client.score(trl_items(prompts, completions))
        return batch.rewards
