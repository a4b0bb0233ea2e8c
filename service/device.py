"""The device policy: every decision that depends on where the model runs, in one pure function.

`device_plan(target, config, settings)` decides the trunk's dtype, TF32, the head's
precision, whether CPU forwards share the cores, pinned host memory, torch.compile's
options, the default batch limits and vLLM's engine limits. It reads nothing but its
arguments, so tests run it on a CPU with CUDA devices described by `Target`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from service.settings import Settings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The reward head's dtype, whatever the trunk's: rewards carry no 16-bit rounding of their own.
HEAD_DTYPE = torch.float32
# Compute capability from which bf16 and TF32 run natively (Ampere).
AMPERE = (8, 0)
# Devices with at least this much memory (H100, H200, A100 80GB) get the larger defaults.
LARGE_MEMORY_BYTES = 70 << 30
# Batch limits when the settings leave them to the device. On a GPU a forward's fixed cost is
# large and batches fill it; on a CPU throughput stops rising at modest batches.
BATCH_LIMITS = {
    "cpu": (64, 16384),
    "cuda": (256, 32768),
    "cuda-large": (512, 65536),
}
# vLLM's engine per step (tokens, sequences), where its own server would pick them: its
# defaults for the offline engine fall back to 2,048 tokens and 128 sequences otherwise.
ENGINE_LIMITS = {"cuda": (8192, 256), "cuda-large": (16384, 1024)}


@dataclass(frozen=True)
class Target:
    """What the policy needs to know about the device the model runs on."""

    device: torch.device
    capability: tuple[int, int] | None = None  # CUDA compute capability
    memory_bytes: int | None = None  # device memory

    @classmethod
    def probe(cls, device: torch.device) -> Target:
        """The real device's properties (CUDA queried; a CPU has none to query)."""
        if device.type != "cuda":
            return cls(device)
        props = torch.cuda.get_device_properties(device)
        return cls(device, (props.major, props.minor), props.total_memory)

    @property
    def kind(self) -> str:
        """'cpu', 'cuda' or 'cuda-large' (a key of the limit tables)."""
        if self.device.type != "cuda":
            return "cpu"
        large = self.memory_bytes is not None and self.memory_bytes >= LARGE_MEMORY_BYTES
        return "cuda-large" if large else "cuda"

    @property
    def ampere(self) -> bool:
        """Whether bf16 and TF32 are native here."""
        return self.capability is not None and self.capability >= AMPERE


@dataclass(frozen=True)
class DevicePlan:
    """How the model runs on its device."""

    device: torch.device
    dtype: torch.dtype  # the trunk's
    head_dtype: torch.dtype  # the reward head's: float32 whatever the trunk's
    tf32: bool  # float32 matrix products may use TF32
    share_cores: bool  # CPU forwards run side by side, sharing the torch threads
    pin_memory: bool  # host batches are pinned, so their copy to the device is asynchronous
    compile_freezing: bool  # torch.compile folds the weights into its graphs as constants
    compile_options: Mapping[str, Any] = field(default_factory=dict)
    max_batch_size: int = 64
    max_batch_tokens: int = 16384
    engine_max_num_batched_tokens: int | None = None  # vLLM; None: its own default
    engine_max_num_seqs: int | None = None


def saved_dtype(config: Any) -> torch.dtype | None:
    """The dtype a checkpoint's config names (`dtype`, else `torch_dtype`), if any."""
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return DTYPES.get(str(saved).removeprefix("torch.")) if saved else None


def trunk_dtype(target: Target, config: Any, setting: str) -> torch.dtype:
    """`setting` unless 'auto'. 'auto': float32 on a CPU (16-bit is slower there); on a GPU
    the checkpoint's 16-bit dtype, else bfloat16 where it is native, else float32."""
    if setting != "auto":
        return DTYPES[setting]
    if target.device.type != "cuda":
        return torch.float32
    saved = saved_dtype(config)
    if saved in (torch.bfloat16, torch.float16):
        return saved
    return torch.bfloat16 if target.ampere else torch.float32


def pins_memory(target: Target) -> bool:
    """Whether host batches are pinned: on a GPU, so their copy to it is asynchronous."""
    return target.device.type == "cuda"


def compile_settings(target: Target) -> tuple[bool, dict[str, Any]]:
    """(freezing, Inductor options) for torch.compile on `target`.

    Frozen constants are a second copy of the weights: affordable on a CPU, where oneDNN
    gains from pre-packed weights; not on a GPU holding a large model. On a CPU, Inductor's
    C++ kernels run on one thread, so that forwards side by side do not oversubscribe it.
    """
    if target.device.type == "cuda":
        return False, {}
    return True, {"cpp.threads": 1}


def device_plan(target: Target, config: Any, settings: Settings) -> DevicePlan:
    """Every device decision for serving `config`'s model on `target` with `settings`.

    Batch limits the settings name explicitly are kept; the others follow the device.
    """
    cuda = target.device.type == "cuda"
    dtype = trunk_dtype(target, config, settings.dtype)
    explicit = settings.model_fields_set
    size, tokens = BATCH_LIMITS[target.kind]
    engine = ENGINE_LIMITS.get(target.kind) if settings.backend == "vllm" else None
    freezing, options = compile_settings(target)
    return DevicePlan(
        device=target.device,
        dtype=dtype,
        head_dtype=HEAD_DTYPE,
        tf32=cuda and target.ampere and dtype == torch.float32,
        share_cores=not cuda and settings.backend == "transformers",
        pin_memory=pins_memory(target),
        compile_freezing=freezing,
        compile_options=options,
        max_batch_size=settings.max_batch_size if "max_batch_size" in explicit else size,
        max_batch_tokens=settings.max_batch_tokens if "max_batch_tokens" in explicit else tokens,
        engine_max_num_batched_tokens=engine[0] if engine else None,
        engine_max_num_seqs=engine[1] if engine else None,
    )
