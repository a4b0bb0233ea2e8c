"""ShardWriter: a shard hashed while it is written, with its header finalised late."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from merger import writer as writer_module
from merger.errors import MergeError
from merger.manifest import MANIFEST_NAME, MergeRecord, verify_artifact
from merger.writer import ArtifactWriter, PlannedTensor, ShardPlan, ShardWriter, plan_shards

SHARD = ShardPlan(
    "model.safetensors",
    (PlannedTensor("a", "F32", (64, 1024)), PlannedTensor("b", "BF16", (3,))),
)
DRAFT = {"hash": "0" * 64}
FINAL = {"hash": "f" * 64}  # same length as the draft: the header keeps its size


def test_finalize_hashes_the_final_file_while_it_is_written(tmp_path: Path) -> None:
    path = tmp_path / SHARD.name
    writer = ShardWriter(path, SHARD, DRAFT)
    a = torch.arange(64 * 1024, dtype=torch.float32).reshape(64, 1024)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    with ThreadPoolExecutor(1) as pool:
        sealed = pool.submit(writer.finalize, FINAL, threading.Event())
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


def test_finalize_stops_when_the_write_is_aborted(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / SHARD.name, SHARD, DRAFT)
    with ThreadPoolExecutor(1) as pool:
        sealed = pool.submit(writer.finalize, FINAL, threading.Event())
        writer.write("a", torch.zeros(8, 1024))
        writer.abort()
        with pytest.raises(MergeError, match="aborted"):
            sealed.result(timeout=30)
    writer.close()


def test_finalize_stops_when_asked(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / SHARD.name, SHARD, DRAFT)
    stop = threading.Event()
    stop.set()
    with pytest.raises(MergeError, match="aborted"):
        writer.finalize(FINAL, stop)
    writer.close()


def test_incomplete_shard_and_a_resized_header_are_refused(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / SHARD.name, SHARD, DRAFT)
    writer.write("a", torch.zeros(64, 1024))
    with pytest.raises(MergeError, match="tensor b was not fully written"):
        writer.complete()
    with pytest.raises(MergeError, match="final header changed size"):
        writer.finalize({"hash": "f" * 80}, threading.Event())
    writer.close()


def _in_writing_thread() -> bool:
    return threading.current_thread().name.startswith("warm-merge-write")


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
        (MemoryError(), "MemoryError()"),  # not an OSError: still the merge's error
    ],
)
def test_a_failed_write_is_raised_to_the_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException, reason: str
) -> None:
    real_write = os.write
    calls = 0

    def failing(fd: int, data: bytes | memoryview) -> int:
        nonlocal calls
        if _in_writing_thread():
            calls += 1
            if calls == 3:
                raise failure
        return real_write(fd, data)

    monkeypatch.setattr(writer_module.os, "write", failing)
    path = tmp_path / SHARD.name
    writer = ShardWriter(path, SHARD, DRAFT)

    def write_all() -> None:
        for _ in range(0, 64, 4):
            writer.write("a", torch.zeros(4, 1024))
        writer.write("b", torch.zeros(3, dtype=torch.bfloat16))
        writer.complete()

    with pytest.raises(MergeError, match=re.escape(f"{path.name}: write failed: {reason}")):
        write_all()
    writer.abort()
    writer.close()
    assert calls == 3  # nothing was written after the failure


def test_chunks_waiting_for_the_disk_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While the disk stalls, write() hands over at most the queue's bytes, then waits.
    real_write = os.write
    stalled = threading.Event()
    release = threading.Event()

    def stalling(fd: int, data: bytes | memoryview) -> int:
        if _in_writing_thread():
            stalled.set()
            release.wait(30)
        return real_write(fd, data)

    chunk = 4 * 1024 * 4  # bytes in 4 rows of "a"
    monkeypatch.setattr(writer_module, "_WRITE_QUEUE_BYTES", 2 * chunk)
    monkeypatch.setattr(writer_module.os, "write", stalling)
    path = tmp_path / SHARD.name
    writer = ShardWriter(path, SHARD, DRAFT)
    a = torch.arange(64 * 1024, dtype=torch.float32).reshape(64, 1024)
    handed = 0

    def produce() -> None:
        nonlocal handed
        for rows in range(0, 64, 4):
            writer.write("a", a[rows : rows + 4])
            handed += 1
        writer.write("b", torch.ones(3, dtype=torch.bfloat16))
        writer.complete()

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        assert stalled.wait(30)
        deadline = time.monotonic() + 30
        while handed < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # time for a third write() to get through, were the bound broken
        # One chunk in the stalled write, one queued (both count), the third write() waiting.
        assert handed == 2 and producer.is_alive()
    finally:
        release.set()
    producer.join(30)
    assert handed == 16 and not producer.is_alive()
    writer.close()
    with safe_open(str(path), framework="pt") as fh:
        assert torch.equal(fh.get_tensor("a"), a)


def _record() -> MergeRecord:
    return MergeRecord(
        tool_version="0", method="average", weights=[1.0], inputs=[], output_dtype="F32", config={}
    )


def test_artifact_writer_writes_every_file_and_its_manifest(tmp_path: Path) -> None:
    shards = plan_shards([PlannedTensor("a", "F32", (4,)), PlannedTensor("b", "F32", (4,))], 16)
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    out = tmp_path / "artifact"
    with ArtifactWriter(out, shards, _record(), _record) as artifact:
        for shard in shards:
            writer = artifact.open_shard(shard)
            for tensor in shard.tensors:
                writer.write(tensor.name, torch.ones(4))
            writer.complete()
        manifest = artifact.finish(_record(), b"{}\n", {"tokenizer.json": tokenizer})
        assert not out.exists()  # renamed into place on leaving the block only
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([*manifest.files, MANIFEST_NAME])
    assert sorted(manifest.files) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
    ]
    verify_artifact(out)


def test_an_unfinished_or_failed_artifact_leaves_nothing(tmp_path: Path) -> None:
    shards = plan_shards([PlannedTensor("a", "F32", (4,))], 1 << 20)
    out = tmp_path / "artifact"

    def unfinished() -> None:
        with ArtifactWriter(out, shards, _record(), _record) as artifact:
            writer = artifact.open_shard(shards[0])
            writer.write("a", torch.ones(4))
            writer.complete()

    def out_of_order() -> None:
        with ArtifactWriter(out, shards, _record(), _record) as artifact:
            artifact.open_shard(ShardPlan("other.safetensors", ()))

    with pytest.raises(MergeError, match="unfinished"):
        unfinished()
    with pytest.raises(MergeError, match="planned order"):
        out_of_order()
    assert list(tmp_path.iterdir()) == []
