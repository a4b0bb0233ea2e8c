"""The validated merge spec and the pure output layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from merger.config import MergeSpec, Method, parse_size
from merger.writer import PlannedTensor, index_json, plan_shards, safetensors_header

A, B, C = Path("a"), Path("b"), Path("c")


def test_parse_size() -> None:
    assert parse_size("1000") == 1000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size(42) == 42
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": (1.0, -1.0)}, "non-negative"),
        ({"weights": (0.0, 0.0)}, "sum to zero"),
        ({"weights": (1.0, float("nan"))}, "finite"),
        ({"weights": (1.0,)}, "1 weights for 2 inputs"),
        ({"method": Method.slerp}, "slerp needs --init"),
        ({"liti": 0.5}, "--liti needs --init"),
        ({"liti": 1.5, "init": C}, r"must lie in \[0, 1\]"),
        ({"dtype": "int8"}, "not one of"),
        ({"max_shard_size": "0"}, "greater than 0"),
    ],
)
def test_invalid_specs_are_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MergeSpec(inputs=(A, B), **kwargs)  # type: ignore[arg-type]


def test_slerp_needs_two_members() -> None:
    with pytest.raises(ValidationError, match="at least two"):
        MergeSpec(inputs=(A,), method=Method.slerp, init=C)


def test_plan_shards_greedy_in_name_order_widest_dtype_first() -> None:
    tensors = [
        PlannedTensor("b", "F32", (10,)),  # 40 bytes
        PlannedTensor("a", "BF16", (10,)),  # 20 bytes
        PlannedTensor("c", "F32", (30,)),  # 120 bytes, bigger than a shard: alone
        PlannedTensor("d", "I64", (1,)),  # 8 bytes
    ]
    shards = plan_shards(tensors, max_shard_size=64)
    assert [s.name for s in shards] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    assert [[t.name for t in s.tensors] for s in shards] == [["b", "a"], ["c"], ["d"]]
    assert [s.nbytes for s in shards] == [60, 120, 8]
    one = plan_shards(tensors, max_shard_size=10**6)
    assert one[0].name == "model.safetensors"
    assert [t.name for t in one[0].tensors] == ["d", "b", "c", "a"]  # 8-byte, 4-byte, 2-byte


def test_safetensors_header_layout() -> None:
    tensors = [PlannedTensor("x", "F32", (2, 3)), PlannedTensor("y", "BF16", (4,))]
    raw = safetensors_header(tensors, {"format": "pt"})
    size = int.from_bytes(raw[:8], "little")
    assert size == len(raw) - 8
    assert size % 8 == 0
    header = json.loads(raw[8:])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["x"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["y"] == {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}


def test_index_json() -> None:
    shards = plan_shards([PlannedTensor("a", "F32", (4,)), PlannedTensor("b", "F32", (4,))], 16)
    doc = json.loads(index_json(shards, {}))
    assert doc["metadata"]["total_size"] == 32
    assert doc["weight_map"] == {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
    }
