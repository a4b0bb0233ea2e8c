"""The transformers backend: `AutoModelForSequenceClassification`, CPU or CUDA.

Batches are right-padded with the model's pad token and an attention mask, so encoders
pool their first token and decoder classifiers (GPT-2, Llama, ...) read their last real
token, exactly as a direct forward pass over one unpadded item does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from service.backends.base import ModelInfo
from service.errors import ErrorType, ServiceError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """'auto' becomes CUDA when present, else CPU; CUDA asked for but absent is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ServiceError(ErrorType.NOT_READY, f"device {device!r}: CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, config: Any) -> torch.dtype:
    """'auto' is float32 on CPU (16-bit is slower there) and the checkpoint's dtype on CUDA."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    saved = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "")
    return DTYPES.get(saved.removeprefix("torch."), torch.float32)


class TransformersBackend:
    """A sequence-classification model held on one device for inference."""

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str,
        dtype: str,
        max_length: int,
        pad_token_id: int,
        trust_remote_code: bool,
    ) -> None:
        self.device = resolve_device(device)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            dtype="auto",
        )
        torch_dtype = resolve_dtype(dtype, self.device, model.config)
        model.config.pad_token_id = pad_token_id
        # Composite configs (vision-language RMs) read the pad id from their text config.
        model.config.get_text_config().pad_token_id = pad_token_id
        self.model = model.to(device=self.device, dtype=torch_dtype).eval()
        self.pad_token_id = pad_token_id
        self.info = ModelInfo(
            architecture=type(model).__name__,
            num_labels=int(model.config.num_labels),
            dtype=str(torch_dtype).removeprefix("torch."),
            device=str(self.device),
            max_length=max_length,
            backend="transformers",
        )

    @torch.inference_mode()
    def forward(self, sequences: Sequence[Sequence[int]], threads: int | None = None) -> np.ndarray:
        """Logits (n, num_labels) of one right-padded batch, on `threads` CPU threads."""
        if threads is not None and torch.get_num_threads() != threads:
            # OpenMP's thread count is per calling thread: other model threads keep theirs.
            torch.set_num_threads(threads)
        longest = max(len(s) for s in sequences)
        ids = np.full((len(sequences), longest), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(sequences), longest), dtype=np.int64)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        logits = self.model(
            input_ids=torch.from_numpy(ids).to(self.device, non_blocking=True),
            attention_mask=torch.from_numpy(mask).to(self.device, non_blocking=True),
        ).logits
        outputs: np.ndarray = logits.to(torch.float64).cpu().numpy()
        return outputs

    def failure(self) -> str | None:
        """In-process: a failing forward fails its batch only, never the model."""
        return None

    def close(self) -> None:
        """Drop the model and return cached device memory."""
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
