"""ShardWriter: a shard hashed while it is written, with its header finalised late."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from merger.errors import MergeError
from merger.writer import PlannedTensor, ShardPlan, ShardWriter

SHARD = ShardPlan(
    "model.safetensors",
    (PlannedTensor("a", "F32", (64, 1024)), PlannedTensor("b", "BF16", (3,))),
)
DRAFT = {"hash": "0" * 64}
FINAL = {"hash": "f" * 64}  # same length as the draft: the header keeps its size


def test_seal_hashes_the_final_file_while_it_is_written(tmp_path: Path) -> None:
    path = tmp_path / SHARD.name
    writer = ShardWriter(path, SHARD, DRAFT)
    a = torch.arange(64 * 1024, dtype=torch.float32).reshape(64, 1024)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    with ThreadPoolExecutor(1) as pool:
        sealed = pool.submit(writer.seal, FINAL, threading.Event())
        for rows in range(0, 64, 4):  # in chunks, as the merge writes
            writer.write("a", a[rows : rows + 4])
        writer.write("b", b)
        writer.complete()
        digest = sealed.result(timeout=30)
    writer.close()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == FINAL
        assert torch.equal(fh.get_tensor("a"), a)
        assert torch.equal(fh.get_tensor("b"), b)


def test_seal_stops_when_the_write_is_aborted(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / SHARD.name, SHARD, DRAFT)
    with ThreadPoolExecutor(1) as pool:
        sealed = pool.submit(writer.seal, FINAL, threading.Event())
        writer.write("a", torch.zeros(8, 1024))
        writer.abort()
        with pytest.raises(MergeError, match="aborted"):
            sealed.result(timeout=30)
    writer.close()


def test_seal_stops_when_asked(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / SHARD.name, SHARD, DRAFT)
    stop = threading.Event()
    stop.set()
    with pytest.raises(MergeError, match="aborted"):
        writer.seal(FINAL, stop)
    writer.close()


def test_incomplete_shard_and_a_resized_header_are_refused(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / SHARD.name, SHARD, DRAFT)
    writer.write("a", torch.zeros(64, 1024))
    with pytest.raises(MergeError, match="tensor b was not fully written"):
        writer.complete()
    with pytest.raises(MergeError, match="final header changed size"):
        writer.seal({"hash": "f" * 80}, threading.Event())
    writer.close()
