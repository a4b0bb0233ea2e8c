"""verl's custom reward hook (rl_client/verl.py), loaded and called exactly as verl 0.9 does,
against a live warm-serve (the last-character RM: +1 for a text ending in a vowel, else -1).

verl loads `reward.custom_reward_function.path` as a file module, takes `.name` from it and
wraps it as `partial(_call_with_kwargs, fn, reward_kwargs)`, where the configured
reward_kwargs win over the call's keyword arguments (verl/trainer/ppo/reward.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import rl_client.verl as verl_hook
from rl_client.errors import RewardClientError

HOOK = Path(verl_hook.__file__)


def _call_with_kwargs(raw_fn: Callable[..., Any], extra: dict[str, Any], *a: Any, **kw: Any) -> Any:
    return raw_fn(*a, **{**kw, **extra})  # verl: config reward_kwargs win


def load_like_verl(name: str, reward_kwargs: dict[str, Any]) -> Callable[..., Any]:
    """verl's get_custom_reward_fn: the file as a module, the function, the kwargs bound."""
    spec = importlib.util.spec_from_file_location("custom_module", HOOK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return partial(_call_with_kwargs, getattr(module, name), reward_kwargs)


def test_batch_hook_scores_through_the_service(rm_server: Any) -> None:
    fn = load_like_verl("compute_score_batch", {"base_url": rm_server.url, "max_retries": 0})
    # BatchRewardManager: data_sources and extra_infos are numpy object arrays.
    scores = fn(
        data_sources=np.array(["gsm8k"] * 3, dtype=object),
        solution_strs=["the sky is blue", "a sofa", "the sun"],
        ground_truths=["", "", ""],
        extra_infos=np.array(
            [
                {"prompt": "why?", "index": 0},
                {"prompt": [{"role": "user", "content": "what sat?"}], "index": 1},
                {"prompt": "what is hot?", "index": 2},
            ],
            dtype=object,
        ),
    )
    assert scores == pytest.approx([1.0, 1.0, -1.0], abs=1e-5)
    assert all(isinstance(s, float) for s in scores)


def test_per_sample_hook_as_the_reward_loop_awaits_it(rm_server: Any) -> None:
    fn = load_like_verl("compute_score", {"base_url": rm_server.url})

    async def run() -> list[Any]:
        calls = [
            fn(data_source="d", solution_str=s, ground_truth=None, extra_info={"prompt": "q"})
            for s in ("yes indeed", "no way", "maybe")
        ]
        return list(await asyncio.gather(*calls))

    assert asyncio.run(run()) == pytest.approx([-1.0, -1.0, 1.0], abs=1e-5)


def test_the_per_sample_hook_works_across_event_loops(rm_server: Any) -> None:
    fn = load_like_verl("compute_score", {"base_url": rm_server.url})

    async def one() -> Any:
        return await fn(solution_str="maybe", extra_info={"prompt": "q"}, data_source="d")

    # Each asyncio.run makes a new loop (possibly at a freed loop's address): a client from
    # a closed loop must not be reused.
    assert [asyncio.run(one()) for _ in range(3)] == pytest.approx([1.0] * 3, abs=1e-5)


def test_a_sample_without_a_prompt_names_itself(rm_server: Any) -> None:
    fn = load_like_verl("compute_score_batch", {"base_url": rm_server.url})
    with pytest.raises(ValueError, match=r"sample 1: extra_info has no prompt"):
        fn(
            data_sources=["a", "b"],
            solution_strs=["x", "y"],
            ground_truths=[None, None],
            extra_infos=[{"prompt": "p"}, {"index": 1}],
        )


def test_failures_raise_by_default_or_give_none(rm_server: Any) -> None:
    # One sample the service refuses (over max_chars_per_item) beside one it scores.
    options = {"base_url": rm_server.url, "max_retries": 0}
    args = {
        "data_sources": ["a", "b"],
        "solution_strs": ["x" * 200_001, "a sofa"],
        "ground_truths": [None, None],
        "extra_infos": [{"prompt": "p"}, {"prompt": "p"}],
    }
    with pytest.raises(RewardClientError, match="characters, the service accepts"):
        load_like_verl("compute_score_batch", options)(**args)
    lenient = load_like_verl("compute_score_batch", {**options, "on_failure": "none"})
    failed, scored = lenient(**args)
    assert failed is None and scored == pytest.approx(1.0, abs=1e-5)


def test_a_dead_service_fails_the_step_whatever_the_policy() -> None:
    options = {"base_url": "http://127.0.0.1:9", "max_retries": 0, "on_failure": "none"}
    with pytest.raises(RewardClientError, match="ConnectError"):
        load_like_verl("compute_score_batch", options)(
            data_sources=["a"],
            solution_strs=["x"],
            ground_truths=[None],
            extra_infos=[{"prompt": "p"}],
        )
