"""Trainer checkpoints: the policy, the optimizer and every RNG, written atomically.

A checkpoint directory holds the policy as a Hugging Face directory (safetensors) and
`trainer_state.pt` (step, optimizer, RNG states). It is written beside the old one and
renamed into place, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

STATE_FILE = "trainer_state.pt"


@dataclass
class Resumed:
    """What a checkpoint restores besides the policy weights."""

    step: int  # the next step to run
    optimizer: dict[str, Any]


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # As plain lists, so the state loads with torch.load(weights_only=True).
        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    directory: Path,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    step: int,
) -> None:
    """Write a checkpoint of the state after `step` steps into `directory`, atomically."""
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    policy.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    torch.save(
        {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state()},
        partial / STATE_FILE,
    )
    previous = directory.with_name(directory.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if directory.exists():
        directory.rename(previous)
    partial.rename(directory)
    shutil.rmtree(previous, ignore_errors=True)


def find(directory: Path) -> Path | None:
    """The checkpoint to resume from: `directory`, or the previous one if a save was cut."""
    for candidate in (directory, directory.with_name(directory.name + ".previous")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def load_state(directory: Path) -> Resumed:
    """Read the trainer state of a checkpoint and restore its RNGs."""
    state = torch.load(directory / STATE_FILE, weights_only=True)
    set_rng_state(state["rng"])
    return Resumed(step=int(state["step"]), optimizer=state["optimizer"])
