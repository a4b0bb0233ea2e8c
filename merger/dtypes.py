"""Safetensors dtype names <-> torch dtypes, and which dtypes are merged arithmetically."""

from __future__ import annotations

import torch

from merger.errors import MergeError

# Safetensors header spelling -> torch dtype.
SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

# Names accepted by --dtype (the spelling of torch / config.json).
OUTPUT_DTYPES: dict[str, str] = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
CONFIG_DTYPE_NAMES = {v: k for k, v in OUTPUT_DTYPES.items()}

FLOATING = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def to_torch(dtype: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype name."""
    try:
        return SAFETENSORS_TO_TORCH[dtype]
    except KeyError:
        raise MergeError(f"unsupported safetensors dtype {dtype!r}") from None


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype."""
    return to_torch(dtype).itemsize


def accumulator_for(out_dtype: str) -> torch.dtype:
    """The accumulation dtype: fp64 where fp32 rounding would show in the output, else fp32.

    Summing M fp32 terms in fp32 leaves errors of a few fp32 ulps in the mean, visible in an
    fp32 output; for 16-bit outputs those errors are far below one output ulp.
    """
    return torch.float64 if out_dtype in ("F32", "F64") else torch.float32
