"""Best-of-N: sample N completions per prompt from a policy, keep the one the RM likes best.

Generation is local (any Hugging Face causal LM); ranking is one /v1/rerank per prompt on the
reward service, all sent at once so the server batches them together.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

from rl_client.client import RewardClient
from rl_client.errors import RewardClientError
from service.protocol import RerankResponse


@dataclass
class BestOfN:
    """One prompt's candidates with their rewards and advantages, and the winner."""

    prompt: str
    candidates: list[str]
    rewards: list[float]  # by candidate index
    best_index: int
    best: str
    advantages: list[float]  # by candidate index: (reward - mean) / sample std

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)


@contextmanager
def _left_padded(tokenizer: PreTrainedTokenizerBase) -> Iterator[PreTrainedTokenizerBase]:
    """The tokenizer set up for batched generation, its settings restored afterwards."""
    # Decoder-only models continue from the last position: padding must go on the left.
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        # Many causal LMs ship without a pad token; masked positions never matter, so EOS does.
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def generate_candidates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    n: int,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int | None = None,
) -> list[list[str]]:
    """`n` sampled completions (new text only) for each prompt, in prompt order."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    # Only models with an LM head mix in `generate` (a bare PreTrainedModel has none).
    if not isinstance(model, GenerationMixin):
        raise TypeError(f"{type(model).__name__} cannot generate: give a causal LM")
    if seed is not None:
        torch.manual_seed(seed)
    completions: list[list[str]] = []
    with _left_padded(tokenizer) as tok, torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            encoded = tok(batch, return_tensors="pt", padding=True).to(model.device)
            # Typed `generate` wants a GenerativePreTrainedModel self and returns a union of
            # output classes; sampling without return_dict_in_generate gives ids only.
            output: torch.Tensor = cast(Any, model).generate(
                **encoded,
                do_sample=True,
                num_return_sequences=n,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                pad_token_id=tok.pad_token_id,
            )  # (len(batch) * n, prompt_len + new), prompt i's samples in rows i*n .. i*n+n-1
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            texts: list[str] = tok.batch_decode(new_tokens, skip_special_tokens=True)
            completions.extend(texts[i * n : (i + 1) * n] for i in range(len(batch)))
    return completions


def best_of_n(
    client: RewardClient, prompts: Sequence[str], candidates: Sequence[Sequence[str]]
) -> list[BestOfN]:
    """Rank each prompt's candidates on the reward service; one result per prompt, in order."""
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    for i, group in enumerate(candidates):
        # A bare string is a Sequence[str] too: it would be ranked letter by letter.
        if isinstance(group, str):
            raise ValueError(f"candidates[{i}] is a string, not a list of candidates")
        if not group:
            raise ValueError(f"candidates[{i}] is empty: prompt {i} needs at least one")
    # Start every request before waiting on any, so the server can batch them together.
    futures = [
        client.rerank_future(list(group), prompt=prompt)
        for prompt, group in zip(prompts, candidates, strict=True)
    ]
    try:
        responses = [future.result() for future in futures]
    except BaseException:
        for future in futures:
            future.cancel()
        concurrent.futures.wait(futures)
        raise
    return [
        _in_candidate_order(prompt, list(group), response)
        for prompt, group, response in zip(prompts, candidates, responses, strict=True)
    ]


def _in_candidate_order(prompt: str, candidates: list[str], response: RerankResponse) -> BestOfN:
    """The rerank response (best first) mapped back to the candidates' own order."""
    if sorted(r.index for r in response.results) != list(range(len(candidates))):
        raise RewardClientError(
            f"rerank returned results for indices {[r.index for r in response.results]} "
            f"but {len(candidates)} candidates were sent"
        )
    rewards = [0.0] * len(candidates)
    advantages = [0.0] * len(candidates)
    for result in response.results:
        rewards[result.index] = result.reward
        advantages[result.index] = result.advantage
    return BestOfN(
        prompt=prompt,
        candidates=candidates,
        rewards=rewards,
        best_index=response.best_index,
        best=candidates[response.best_index],
        advantages=advantages,
    )
