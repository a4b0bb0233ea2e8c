"""Experiment 4: `warm-rl train` against WARM and against the best single RM.

The proxy reward is a real `warm-serve` on loopback serving the reward model; the control
reward is the oracle, served by `oracle_server` and passed as `--control-url`, so it is
logged every step and never optimised. Reward hacking shows as the proxy reward rising while
the control reward stalls or falls. At the end both policies answer the same held-out
prompts and the oracle judges them: the win rate of the WARM-trained policy.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from experiments import win_rate
from oracle_server import create_oracle_app

from merger.hashing import sha256_file
from merger.recipe.prefdata import oracle
from service.app import create_app
from service.loopback import serve
from service.settings import Settings


@dataclass(frozen=True)
class RLSetup:
    """`warm-rl train` arguments shared by both runs."""

    steps: int = 300
    prompts_per_step: int = 8
    group_size: int = 4
    max_new_tokens: int = 48
    lr: float = 5e-4
    kl_coef: float = 0.01
    seed: int = 0


def train_against(
    reward_model: Path,
    policy: Path,
    prompts: Path,
    control_url: str,
    out: Path,
    rl: RLSetup,
) -> list[dict[str, float]]:
    """One `warm-rl train` run (resumed if it was cut); returns its per-step log."""
    with serve(create_app(Settings(model=reward_model, torch_threads=1))) as url:
        args = {
            "policy": policy,
            "prompts": prompts,
            "reward-url": url,
            "control-url": control_url,
            "out": out,
            "steps": rl.steps,
            "prompts-per-step": rl.prompts_per_step,
            "group-size": rl.group_size,
            "max-new-tokens": rl.max_new_tokens,
            "lr": rl.lr,
            "kl-coef": rl.kl_coef,
            "seed": rl.seed,
            "save-every": 25,
            "device": "cpu",
        }
        argv = [sys.executable, "-m", "rl_client.cli", "train", "--no-console"]
        argv += [f"--{k}={v}" for k, v in args.items()]
        # One thread each for the trainer and the reward server: 2 cores, no oversubscription.
        subprocess.run(argv, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    with (out / "log.jsonl").open() as fh:
        return [json.loads(line) for line in fh]


def sample_oracle(policy: Path, prompts: Sequence[str], n: int, max_new_tokens: int) -> list[float]:
    """Oracle rewards of n samples per prompt from the policy, prompt-major."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl_client.rollout import sample

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    tokenizer = AutoTokenizer.from_pretrained(policy)
    scores: list[float] = []
    for i in range(0, len(prompts), 16):
        batch = list(prompts[i : i + 16])
        rollout = sample(model, tokenizer, batch, n, max_new_tokens=max_new_tokens, temperature=1.0)
        pairs = zip(rollout.prompts, rollout.completions, strict=True)
        scores += [oracle(str(p), c) for p, c in pairs]
    return scores


def run_key(*parts: object) -> str:
    """A short hash naming a run by everything that determines it."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def rl_experiment(
    targets: dict[str, Path],
    policy: Path,
    prompts: Path,
    eval_prompts: Sequence[str],
    root: Path,
    rl: RLSetup,
) -> dict[str, Any]:
    """Train one policy per reward model in `targets`; compare them with the oracle."""

    logs: dict[str, list[dict[str, float]]] = {}
    finals: dict[str, list[float]] = {}
    with serve(create_oracle_app()) as control_url:
        for name, model in targets.items():
            weights = [sha256_file(p) for p in sorted(model.glob("*.safetensors"))]
            key = run_key(asdict(rl), sha256_file(policy / "model.safetensors"), weights)
            out = root / f"{name.replace(' ', '-')}-{key}"
            logs[name] = train_against(model, policy, prompts, control_url, out, rl)
            finals[name] = sample_oracle(out / "checkpoint", eval_prompts, 4, rl.max_new_tokens)
    initial = sample_oracle(policy, eval_prompts, 4, rl.max_new_tokens)
    names = list(targets)
    return {
        "setup": asdict(rl),
        "logs": logs,
        "initial_control": sum(initial) / len(initial),
        "final_control": {n: sum(v) / len(v) for n, v in finals.items()},
        "win_rate": win_rate(finals[names[0]], finals[names[1]]),
        "win_rate_of": names[0],
        "against": names[1],
        "eval_samples": len(initial),
    }
