"""Prompts in, completions out: prompt batches, sampling G completions, and their logits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.protocol import Item, Message

Prompt = str | list[dict[str, str]]  # plain text, or a chat (role/content turns)

DEFAULT_PROMPTS: list[Prompt] = [
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "How do I bake bread at home?",
    "Summarise the plot of a heist film.",
    "What makes a good reward model?",
    "Give three tips for a job interview.",
    "Describe a quiet morning in a small town.",
    "Why does averaging weights reduce reward hacking?",
]


def read_prompts(path: Path | None) -> list[Prompt]:
    """Prompts from JSONL ('prompt' or 'messages' per line) or a text file, one per line."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no prompts")
    if path.suffix not in {".jsonl", ".json"}:
        return list(lines)
    prompts: list[Prompt] = []
    for number, line in enumerate(lines, 1):
        record = json.loads(line)
        if isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        elif isinstance(record.get("messages"), list):
            chat = [Message.model_validate(m) for m in record["messages"]]
            prompts.append([m.as_turn() for m in chat])
        else:
            raise ValueError(f"{path}:{number}: expected a 'prompt' string or a 'messages' list")
    return prompts


def prompt_batch(n_prompts: int, step: int, size: int, seed: int) -> list[int]:
    """Indices of the prompts of `step`: the prompt stream is a seeded permutation per epoch.

    A function of the step alone, so that a resumed run sees the same prompts.
    """
    indices = []
    for position in range(step * size, (step + 1) * size):
        epoch, offset = divmod(position, n_prompts)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        indices.append(int(torch.randperm(n_prompts, generator=generator)[offset]))
    return indices


def completion_mask(tokens: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """Which completion tokens count: every token up to and including the first EOS."""
    # tokens: (N, T) -> (N, T) bool
    if eos_id is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    is_eos = (tokens == eos_id).long()
    # A position counts if no EOS came strictly before it.
    before = torch.cumsum(is_eos, dim=1) - is_eos
    return before == 0


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    """The text the policy continues: chats through the tokenizer's chat template."""
    if isinstance(prompt, str):
        return prompt
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return str(text)


@dataclass
class Rollout:
    """G sampled completions per prompt, group-major: rows g*G .. g*G+G-1 share prompt g."""

    prompts: list[Prompt]  # (N,) each prompt repeated G times
    completions: list[str]  # (N,) decoded, special tokens dropped
    input_ids: torch.Tensor  # (N, P + T) left-padded prompt, then the completion
    attention_mask: torch.Tensor  # (N, P + T) 0 on padding and after the first EOS
    mask: torch.Tensor  # (N, T) bool: completion tokens in the loss
    prompt_length: int  # P

    @property
    def completion_ids(self) -> torch.Tensor:
        """(N, T) sampled tokens."""
        return self.input_ids[:, self.prompt_length :]

    def items(self) -> list[Item]:
        """What the reward model scores: each prompt (or chat) with its completion."""
        items = []
        for prompt, completion in zip(self.prompts, self.completions, strict=True):
            if isinstance(prompt, str):
                items.append(Item(prompt=prompt, response=completion))
            else:
                chat = [*prompt, {"role": "assistant", "content": completion}]
                items.append(Item(messages=[Message.model_validate(m) for m in chat]))
        return items


@torch.no_grad()  # not inference_mode: the tokens are reused under autograd
def sample(
    policy: Any,  # a Hugging Face causal LM (its generate() is untyped)
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    group_size: int,
    *,
    max_new_tokens: int,
    temperature: float,
) -> Rollout:
    """Sample `group_size` completions per prompt from the policy's full distribution."""
    device = next(policy.parameters()).device
    chat = not isinstance(prompts[0], str)
    encoded = tokenizer(
        [prompt_text(tokenizer, p) for p in prompts],
        return_tensors="pt",
        padding=True,
        padding_side="left",
        add_special_tokens=not chat,  # a chat template already holds its special tokens
    ).to(device)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    # top_k=0, top_p=1: sample the policy itself, so the loss's log-probs are those of
    # the distribution that produced the tokens (generation configs often default top_k=50).
    output = policy.generate(
        **encoded,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=group_size,
        pad_token_id=pad_id,
    )  # (N, P + T)
    length = encoded["input_ids"].shape[1]
    completion = output[:, length:]  # (N, T)
    mask = completion_mask(completion, tokenizer.eos_token_id)
    prompt_attention = encoded["attention_mask"].repeat_interleave(group_size, dim=0)
    attention = torch.cat([prompt_attention, mask.long()], dim=1)
    shown = torch.where(mask, completion, pad_id if pad_id is not None else 0)
    texts = tokenizer.batch_decode(shown, skip_special_tokens=True)
    return Rollout(
        prompts=[p for p in prompts for _ in range(group_size)],
        completions=texts,
        input_ids=output,
        attention_mask=attention,
        mask=mask,
        prompt_length=length,
    )


def completion_logits(model: PreTrainedModel, rollout: Rollout, temperature: float) -> torch.Tensor:
    """(N, T, V) logits of the completion tokens, scaled by the sampling temperature."""
    positions = (rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=positions
    ).logits  # (N, P + T, V)
    start = rollout.prompt_length - 1
    scaled: torch.Tensor = logits[:, start:-1] / temperature  # [:, t] predicts token t
    return scaled
