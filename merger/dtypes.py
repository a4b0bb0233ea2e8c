"""Safetensors dtype names <-> torch dtypes, and which dtypes are merged arithmetically.

The string tables import nothing heavy, so the CLI can validate options (and print --help)
without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from merger.errors import MergeError

if TYPE_CHECKING:
    import torch

ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOATING = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# Names accepted by --dtype (the spelling of torch / config.json).
OUTPUT_DTYPES: dict[str, str] = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
CONFIG_DTYPE_NAMES = {v: k for k, v in OUTPUT_DTYPES.items()}


def to_torch(dtype: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype name."""
    import torch

    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
        "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
    }  # fmt: skip
    try:
        return table[dtype]
    except KeyError:
        raise MergeError(f"unsupported safetensors dtype {dtype!r}") from None


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype."""
    try:
        return ITEMSIZE[dtype]
    except KeyError:
        raise MergeError(f"unsupported safetensors dtype {dtype!r}") from None
