"""`warm-rl train`: REINFORCE / RLOO against a reward endpoint, with a KL penalty in the reward.

One step, top to bottom:
  sample G completions per prompt from the policy
  -> send them to the reward endpoint (and the control endpoint), without waiting
  -> meanwhile: reference log-probs, policy log-probs and entropy on the same tokens
  -> return = reward - alpha * KL_k1(policy || reference), per completion
  -> advantage: leave-one-out baseline within each prompt's group (RLOO), or none
  -> loss = -advantage * log-prob of the completion; clip; AdamW step.
The next step samples from the updated policy (on-policy), so the reward call overlaps with
the two forward passes of its own step rather than with the next generation.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from merger.scoring import resolve_device
from rl_client import checkpoint
from rl_client.client import RewardClient, ScoreBatch
from rl_client.config import TrainConfig
from rl_client.losses import (
    kl_k1,
    masked_mean,
    policy_gradient_loss,
    reinforce_advantages,
    rloo_advantages,
    shaped_returns,
    token_entropy,
    token_logprobs,
)
from rl_client.rollout import completion_logits, prompt_batch, read_prompts, sample
from service.protocol import Item

COLUMNS = ("step", "reward", "reward_std", "kl", "return", "length", "entropy", "reward_s")


class Scorer(Protocol):
    """Where rewards come from: the HTTP client, or an in-process model (benchmarks)."""

    def score_future(self, items: Sequence[Item], **options: Any) -> Future[ScoreBatch]:
        """Start scoring `items`; the future holds one result (or None) per item."""
        ...


def timed(future: Future[ScoreBatch]) -> Callable[[], float]:
    """The seconds from now until `future` completes, readable once it has."""
    start = time.perf_counter()
    done: list[float] = []
    future.add_done_callback(lambda _: done.append(time.perf_counter() - start))
    return lambda: done[0] if done else time.perf_counter() - start


def rewards_of(batch: ScoreBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) float rewards (NaN where missing) and (N,) bool validity."""
    values = [math.nan if r is None else r for r in batch.rewards]
    rewards = torch.tensor(values, dtype=torch.float32, device=device)
    return rewards, ~torch.isnan(rewards)


def train(
    cfg: TrainConfig, scorer: Scorer | None = None, control: Scorer | None = None
) -> list[dict[str, float]]:
    """Run `cfg.steps` policy updates (resuming from `cfg.out` when it holds a checkpoint)."""
    if cfg.baseline == "rloo" and cfg.group_size < 2:
        raise ValueError("baseline 'rloo' needs group_size >= 2 (or use baseline 'none')")
    device = resolve_device(cfg.device)
    prompts = read_prompts(cfg.prompts)
    cfg.out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = cfg.out / "checkpoint"
    resume_from = checkpoint.find(ckpt_dir) if cfg.resume else None
    torch.manual_seed(cfg.seed)

    tokenizer = AutoTokenizer.from_pretrained(resume_from or cfg.policy)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy: Any = AutoModelForCausalLM.from_pretrained(resume_from or cfg.policy)
    reference: Any = AutoModelForCausalLM.from_pretrained(cfg.policy)
    policy.to(device)
    reference.to(device)
    # Eval mode throughout: dropout would make the sampled and the trained distributions differ.
    policy.eval()
    reference.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    start = 0
    if resume_from is not None:
        resumed = checkpoint.load_state(resume_from)
        optimizer.load_state_dict(resumed.optimizer)
        start = resumed.step

    clients: list[RewardClient] = []
    if scorer is None:
        client = RewardClient(config=cfg.client_config())
        clients.append(client)
        scorer = client
    if control is None and cfg.control_url is not None:
        control = RewardClient(cfg.control_url, api_key=cfg.api_key, on_failure="none")
        clients.append(control)

    log_path = cfg.out / "log.jsonl"
    history = _read_log(log_path, before=start)
    console = Console(highlight=False) if cfg.console else None
    if console is not None:
        console.print(" ".join(f"{c:>9}" for c in COLUMNS), style="bold")
    B, G = cfg.prompts_per_step, cfg.group_size
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            batch = [prompts[i] for i in prompt_batch(len(prompts), step, B, cfg.seed)]
            rollout = sample(
                policy,
                tokenizer,
                batch,
                G,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
            )
            t_sampled = time.perf_counter()
            items = rollout.items()
            pending = scorer.score_future(items)
            reward_latency = timed(pending)
            control_pending = control.score_future(items) if control is not None else None

            # While the rewards are computed: the forward passes of this step.
            tokens, mask = rollout.completion_ids, rollout.mask  # (N, T)
            with torch.no_grad():
                ref_logp = token_logprobs(
                    completion_logits(reference, rollout, cfg.temperature), tokens
                )  # (N, T)
            logits = completion_logits(policy, rollout, cfg.temperature)  # (N, T, V)
            logp = token_logprobs(logits, tokens)  # (N, T)
            entropy = masked_mean(token_entropy(logits.detach()), mask)

            t_wait = time.perf_counter()
            rewards, valid = rewards_of(pending.result(), device)  # (N,)
            reward_wait = time.perf_counter() - t_wait
            kl = kl_k1(logp.detach(), ref_logp, mask)  # (N,)
            returns = shaped_returns(rewards, kl, cfg.kl_coef)  # (N,)
            groups, ok = returns.view(B, G), valid.view(B, G)
            if cfg.baseline == "rloo":
                advantages = rloo_advantages(groups, ok)
            else:
                advantages = reinforce_advantages(groups, ok)
            loss = policy_gradient_loss(logp, mask, advantages.flatten(), valid)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            optimizer.step()

            n_valid = int(valid.sum())
            kept = rewards[valid]
            record: dict[str, float] = {
                "step": step + 1,
                "reward": float(kept.mean()) if n_valid else math.nan,
                "reward_std": float(kept.std()) if n_valid > 1 else 0.0,
                "kl": float(kl.mean()),
                "return": float(returns[valid].mean()) if n_valid else math.nan,
                "length": float(mask.sum(dim=1).float().mean()),
                "entropy": float(entropy),
                "loss": float(loss.detach()),
                "grad_norm": float(grad_norm),
                "missing_rewards": float(len(valid) - n_valid),
                "reward_s": reward_latency(),
                "reward_wait_s": reward_wait,
                "sample_s": t_sampled - t0,
            }
            if control_pending is not None:
                control_rewards = [r for r in control_pending.result().rewards if r is not None]
                record["control_reward"] = (
                    sum(control_rewards) / len(control_rewards) if control_rewards else math.nan
                )
            record["step_s"] = time.perf_counter() - t0
            history.append(record)
            with log_path.open("a") as log:
                log.write(json.dumps(record) + "\n")
            if console is not None:
                console.print(" ".join(_cell(record.get(c)) for c in COLUMNS))
            done = step + 1
            if done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
                checkpoint.save(ckpt_dir, policy, tokenizer, optimizer, done)
    finally:
        for client in clients:
            client.close()
    return history


def _cell(value: float | None) -> str:
    if value is None:
        return f"{'-':>9}"
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):>9d}"
    return f"{value:>9.4f}"


def _read_log(path: Path, before: int) -> list[dict[str, float]]:
    """The records of steps already done; later ones (after the checkpoint) are dropped."""
    if not path.exists():
        return []
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in kept if r["step"] <= before]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept
