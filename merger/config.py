"""The validated merge specification: one pydantic model that the CLI maps its flags onto."""

from __future__ import annotations

import math
import re
from enum import Enum
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merger.dtypes import OUTPUT_DTYPES

DEFAULT_MAX_SHARD_SIZE = 5 * 1000**3
# Elements per accumulator chunk: small enough that one fp64 chunk stays in cache across
# the M inputs, large enough that per-chunk file opens cost nothing measurable.
DEFAULT_CHUNK_ELEMENTS = 1 << 16

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}
_UNITS |= {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_size(value: str | int) -> int:
    """Bytes from an int or a string such as '500MB', '2GiB' or '1000000'."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"not a size: {value!r} (expected e.g. 2000000000, 500MB or 2GiB)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").upper()])


class Method(str, Enum):
    """How the member weights are combined."""

    average = "average"
    slerp = "slerp"


class MergeSpec(BaseModel):
    """Everything `warm-merge build` needs, validated before any file is read."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    inputs: Annotated[
        tuple[Path, ...],
        Field(min_length=1, description="Member checkpoints: HF model dirs or .safetensors files."),
    ]
    method: Method = Field(Method.average, description="average (WARM) or slerp (WARP).")
    weights: tuple[float, ...] | None = Field(
        None, description="Non-negative member weights, normalised to the simplex; default uniform."
    )
    init: Path | None = Field(
        None, description="The shared initialisation: required by slerp and by liti."
    )
    liti: float | None = Field(
        None, description="Interpolate toward init: (1 - eta) * init + eta * merged."
    )
    dtype: str | None = Field(
        None, description="Output dtype of floating tensors (default: the inputs' dtype)."
    )
    max_shard_size: int = Field(DEFAULT_MAX_SHARD_SIZE, gt=0, description="Bytes per shard.")
    allow_multi_head: bool = Field(False, description="Accept heads with num_labels > 1.")
    ignore_config_keys: tuple[str, ...] = Field(
        (), description="Extra config.json keys allowed to differ (e.g. training-only dropout)."
    )
    chunk_elements: int = Field(DEFAULT_CHUNK_ELEMENTS, gt=0, description="Elements per chunk.")

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _size(cls, value: str | int) -> int:
        return parse_size(value)

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is None:
            return None
        for i, w in enumerate(value):
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"weight {i} is {w}: weights must be finite and non-negative")
        if sum(value) <= 0:
            raise ValueError("weights sum to zero: at least one member needs a positive weight")
        return value

    @field_validator("liti")
    @classmethod
    def _liti(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"liti eta is {value}: it must lie in [0, 1]")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in OUTPUT_DTYPES:
            raise ValueError(f"dtype {value!r} is not one of {', '.join(OUTPUT_DTYPES)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MergeSpec:
        if self.weights is not None and len(self.weights) != len(self.inputs):
            raise ValueError(
                f"{len(self.weights)} weights for {len(self.inputs)} inputs: give one per input"
            )
        if self.method is Method.slerp:
            if self.init is None:
                raise ValueError("slerp needs --init: SLERP interpolates task vectors from init")
            if len(self.inputs) < 2:
                raise ValueError("slerp needs at least two inputs")
        if self.liti is not None and self.init is None:
            raise ValueError("--liti needs --init: it interpolates the result toward init")
        return self
