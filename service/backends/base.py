"""The interface between the schedulers and a model: token ids in, reward-head outputs out."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class OutOfMemory(Exception):
    """A forward ran out of device memory: its batch was too large (a smaller one may fit)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is, as the API reports it."""

    architecture: str
    num_labels: int
    dtype: str
    device: str
    max_length: int
    backend: str
    compiled: bool = False  # torch.compile'd by warm-serve (the transformers backend's --compile)
    head_dtype: str = "float32"  # the reward head's (the trunk runs in `dtype`)


class Backend(Protocol):
    """A loaded reward model. `forward` is called from the scheduler's model threads only;
    on a CPU from several at once (`cores.CoreShare`), so it must not mutate shared state."""

    info: ModelInfo

    def forward(self, sequences: Sequence[Sequence[int]], threads: int | None = None) -> np.ndarray:
        """Outputs of shape (len(sequences), num_labels), float64, in input order. `threads`:
        the CPU threads this call may use (None: as configured at load). Raises
        `OutOfMemory` when the batch does not fit the device's memory."""

    def failure(self) -> str | None:
        """Why the model can no longer serve at all (a dead engine process, a device whose
        context a device-side assert broke), else None."""

    def free_memory(self) -> None:
        """Return cached device memory (after an `OutOfMemory`)."""

    def close(self) -> None:
        """Release the model's memory."""


class ContinuousBackend(Backend, Protocol):
    """A backend that batches by itself, continuously (vLLM's engine): items go straight in."""

    def submit(self, sequences: Sequence[Sequence[int]]) -> Future[np.ndarray]:
        """Start scoring `sequences` (callable from any thread); the future has `forward`'s
        result. Cancelling the future withdraws the items still waiting in the backend."""
