"""The artifact on disk: sharded, streaming, atomic output of safetensors files.

safetensors' own writers need every tensor of a shard in memory; the merger produces each
tensor in chunks, so shards are written here: header first (all shapes are known up front),
then tensor bytes in header order, chunk by chunk. `ArtifactWriter` owns everything in the
artifact directory (shards, index, config, tokenizer files, manifest) and every thread that
writes or hashes it; the directory is written beside the destination and renamed into place
only when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import torch

from merger.checkpoints import CONFIG_NAME, INDEX_NAME
from merger.dtypes import itemsize, to_torch
from merger.errors import MergeError
from merger.hashing import sha256_file
from merger.manifest import (
    MANIFEST_NAME,
    Manifest,
    MergeRecord,
    build_manifest,
    manifest_bytes,
    shard_metadata,
)


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor: name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of data."""
        return itemsize(self.dtype) * math.prod(self.shape)


@dataclass(frozen=True)
class ShardPlan:
    """One output file and its tensors, in on-disk order."""

    name: str
    tensors: tuple[PlannedTensor, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in this shard."""
        return sum(t.nbytes for t in self.tensors)


def _disk_order(tensors: Sequence[PlannedTensor]) -> tuple[PlannedTensor, ...]:
    # Widest dtype first keeps every tensor aligned to its itemsize (the header is padded to
    # 8 bytes), as safetensors' own writer does.
    return tuple(sorted(tensors, key=lambda t: (-itemsize(t.dtype), t.name)))


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_size: int) -> list[ShardPlan]:
    """Greedy shards in name order, each at most max_shard_size bytes (a bigger tensor alone)."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in sorted(tensors, key=lambda t: t.name):
        if groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    if len(groups) == 1:
        return [ShardPlan("model.safetensors", _disk_order(groups[0]))]
    n = len(groups)
    return [
        ShardPlan(f"model-{i + 1:05d}-of-{n:05d}.safetensors", _disk_order(g))
        for i, g in enumerate(groups)
    ]


def index_json(shards: Sequence[ShardPlan], metadata: dict[str, str]) -> bytes:
    """The model.safetensors.index.json of a sharded artifact."""
    weight_map = {t.name: s.name for s in shards for t in s.tensors}
    total = sum(s.nbytes for s in shards)
    doc = {
        "metadata": {"total_size": total, **metadata},
        "weight_map": dict(sorted(weight_map.items())),
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def safetensors_header(tensors: Sequence[PlannedTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and the space-padded JSON header for tensors in the given order."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_FOLLOW_BLOCK = 1 << 20  # bytes read back per hash update while following a writer
_FOLLOW_POLL_S = 0.1  # how often a waiting follower checks for cancellation
# Bytes handed to the writing thread and not yet written (one bigger chunk is admitted alone).
_WRITE_QUEUE_BYTES = 32 << 20


class ShardWriter:
    """Writes one shard's tensors in order, chunk by chunk; checks every byte count.

    `write` checks a chunk and hands it (a copy, unless the caller owns it) to this shard's
    writing thread, so the merge goes on computing while the kernel takes the bytes (a write
    may stall). At most
    _WRITE_QUEUE_BYTES are pending; a failed write is raised by the next `write` or by
    `complete`.

    The header's metadata is only final once the inputs are hashed, so the shard is written
    with a draft header of the same length; `finalize` (on another thread) writes the final
    one and hashes the file while the tensors are still being appended, following the writer.
    """

    def __init__(self, path: Path, shard: ShardPlan, metadata: dict[str, str]) -> None:
        self.path = path
        self.shard = shard
        self._header = safetensors_header(shard.tensors, metadata)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self._index = 0  # the tensor being written
        self._written = 0  # its bytes so far
        self._end = 0  # bytes in the file
        self._done = False
        self._aborted = False
        self._grown = threading.Condition()  # guards everything below and the fields above
        self._queue: deque[memoryview] = deque()
        self._queued = 0  # bytes queued or being written
        self._closing = False  # no more chunks will come
        self._error: MergeError | None = None
        self._append(memoryview(self._header))
        self._thread = threading.Thread(
            target=self._drain, name=f"warm-merge-write-{path.name}", daemon=True
        )
        self._thread.start()

    def _append(self, data: memoryview) -> None:
        done = 0
        while done < data.nbytes:
            done += os.write(self._fd, data[done:])
        with self._grown:
            self._end += data.nbytes
            self._grown.notify_all()

    def _drain(self) -> None:
        while True:
            with self._grown:
                while not self._queue and not (self._closing or self._aborted):
                    self._grown.wait()
                if self._aborted or not self._queue:
                    return
                data = self._queue.popleft()
            try:
                self._append(data)
            except BaseException as exc:  # whatever it is, the merge must hear of it
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
                with self._grown:
                    self._error = MergeError(f"{self.path.name}: write failed: {reason}")
                    self._grown.notify_all()
                return
            with self._grown:
                self._queued -= data.nbytes
                self._grown.notify_all()

    def _enqueue(self, data: memoryview) -> None:
        with self._grown:
            while (
                self._queued
                and self._queued + data.nbytes > _WRITE_QUEUE_BYTES
                and not (self._error or self._aborted)
            ):
                self._grown.wait()
            if self._error is not None:
                raise self._error
            if self._aborted:
                raise MergeError(f"{self.path.name}: write aborted")
            self._queue.append(data)
            self._queued += data.nbytes
            self._grown.notify_all()

    def write(self, name: str, chunk: torch.Tensor, *, owned: bool = False) -> None:
        """Append the next chunk of tensor `name` (rows in order, the planned dtype).

        The chunk is copied, as callers reuse their buffers; with `owned` (a tensor nobody
        changes afterwards) it is queued as it is.
        """
        if self._index >= len(self.shard.tensors):
            raise MergeError(f"{self.path.name}: tensor {name} written past the end of the shard")
        target = self.shard.tensors[self._index]
        if name != target.name or chunk.dtype != to_torch(target.dtype):
            raise MergeError(
                f"{self.path.name}: expected {target.name} ({target.dtype}), "
                f"got {name} ({chunk.dtype})"
            )
        data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._written += data.nbytes
        if self._written > target.nbytes:
            raise MergeError(f"{self.path.name}: tensor {name} got more bytes than its shape holds")
        self._enqueue(data.data if owned else memoryview(data.tobytes()))
        if self._written == target.nbytes:
            self._index += 1
            self._written = 0

    def complete(self) -> None:
        """Check that every tensor was fully written and wait for the writing thread; a
        follower may then finish."""
        if self._index != len(self.shard.tensors):
            missing = self.shard.tensors[self._index].name
            raise MergeError(f"{self.path.name}: tensor {missing} was not fully written")
        self._stop_thread()
        with self._grown:
            if self._error is not None:
                raise self._error
            expected = len(self._header) + self.shard.nbytes
            if self._end != expected:
                raise MergeError(f"{self.path.name}: {self._end} bytes written, {expected} planned")
            self._done = True
            self._grown.notify_all()

    def _stop_thread(self) -> None:
        with self._grown:
            self._closing = True
            self._grown.notify_all()
        self._thread.join()

    def finalize(self, metadata: dict[str, str], stop: threading.Event) -> str:
        """Write the final header, hash the shard as it grows, fsync; return its SHA-256.

        Runs beside the writer and returns once `complete` was called and every byte is
        hashed; raises MergeError if the write is aborted or `stop` is set.
        """
        header = safetensors_header(self.shard.tensors, metadata)
        # Metadata values filled in late (input hashes) have fixed lengths, so the header
        # keeps its size and the data offsets stay valid.
        if len(header) != len(self._header):
            raise MergeError(f"{self.path.name}: final header changed size")
        if os.pwrite(self._fd, header, 0) != len(header):
            raise MergeError(f"{self.path.name}: short write of the final header")
        digest = hashlib.sha256(header)
        block = bytearray(_FOLLOW_BLOCK)
        pos = len(header)
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(pos)
            while True:
                with self._grown:
                    while pos == self._end and not (self._done or self._aborted or stop.is_set()):
                        self._grown.wait(_FOLLOW_POLL_S)
                    end, done = self._end, self._done
                if self._aborted or stop.is_set():
                    raise MergeError(f"{self.path.name}: write aborted")
                if pos == end and done:
                    break
                n = fh.readinto(memoryview(block)[: min(end - pos, _FOLLOW_BLOCK)])
                if not n:
                    raise MergeError(f"{self.path.name}: shorter than written")
                digest.update(memoryview(block)[:n])
                pos += n
        os.fsync(self._fd)
        return digest.hexdigest()

    def abort(self) -> None:
        """Drop queued chunks, stop any follower; `close` then releases the file (its
        directory is removed)."""
        with self._grown:
            self._aborted = True
            self._queue.clear()
            self._grown.notify_all()

    def close(self) -> None:
        """Stop the writing thread and close the file descriptor (after `finalize`
        returned, or after `abort`)."""
        self._stop_thread()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class AtomicDirectory:
    """A directory written in a temporary sibling and renamed into place on success only."""

    def __init__(self, destination: Path, *, overwrite: bool = False) -> None:
        self.destination = destination.expanduser().resolve()
        self.overwrite = overwrite
        self._tmp: Path | None = None

    @property
    def path(self) -> Path:
        """The temporary directory being filled."""
        if self._tmp is None:
            raise RuntimeError("AtomicDirectory used outside its context")
        return self._tmp

    def __enter__(self) -> AtomicDirectory:
        dest = self.destination
        if dest.exists() and not self.overwrite:
            raise MergeError(f"{dest}: already exists (pass --force to replace it)")
        if not dest.parent.is_dir():
            raise MergeError(f"{dest.parent}: output parent directory does not exist")
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        return self

    def write_file(self, name: str, data: bytes) -> Path:
        """Write a small file into the directory and fsync it."""
        path = self.path / name
        with path.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return path

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tmp = self.path
        self._tmp = None
        if exc_type is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        try:
            _fsync_dir(tmp)
            dest = self.destination
            trash = None
            if dest.exists():
                if not self.overwrite:
                    raise MergeError(f"{dest}: appeared while merging; nothing was replaced")
                trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
                dest.rename(trash / dest.name)
            tmp.rename(dest)
            _fsync_dir(dest.parent)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


class ArtifactWriter:
    """One artifact directory, written atomically, and every thread that writes or hashes it.

    Inside `with`: `open_shard` each planned shard in turn and write its tensors; each shard
    is finalised (final header, SHA-256) on this writer's thread as it grows, once
    `final_record` (called there, blocking until the inputs are hashed) returns. Then
    `finish` writes the index, config.json, tokenizer files and the manifest. Leaving the
    block renames the directory into place; on an exception nothing is left behind.
    """

    def __init__(
        self,
        destination: Path,
        shards: Sequence[ShardPlan],
        draft: MergeRecord,
        final_record: Callable[[], MergeRecord],
        *,
        overwrite: bool = False,
    ) -> None:
        """`draft`: the record in each shard's header until it is finalised (same size)."""
        self._directory = AtomicDirectory(destination, overwrite=overwrite)
        self._shards = tuple(shards)
        self._draft = shard_metadata(draft)
        self._final_record = final_record
        self._stop = threading.Event()
        self._writers: list[ShardWriter] = []
        self._digests: list[Future[str]] = []
        self._finalizing: ThreadPoolExecutor | None = None
        self._manifest: Manifest | None = None

    def __enter__(self) -> ArtifactWriter:
        self._directory.__enter__()
        self._finalizing = ThreadPoolExecutor(1, thread_name_prefix="warm-merge-finalize")
        return self

    def open_shard(self, shard: ShardPlan) -> ShardWriter:
        """The writer of the next planned shard; its finalisation starts now."""
        if self._finalizing is None or len(self._writers) >= len(self._shards):
            raise MergeError(f"{shard.name}: not the next planned shard of this artifact")
        if shard != self._shards[len(self._writers)]:
            raise MergeError(f"{shard.name}: shards must be written in their planned order")
        writer = ShardWriter(self._directory.path / shard.name, shard, self._draft)
        self._writers.append(writer)
        self._digests.append(self._finalizing.submit(self._finalize, writer))
        return writer

    def _finalize(self, writer: ShardWriter) -> str:
        return writer.finalize(shard_metadata(self._final_record()), self._stop)

    def finish(
        self, record: MergeRecord, config: bytes | None, aux_files: Mapping[str, Path]
    ) -> Manifest:
        """After every shard is complete: wait for their digests, then write the index (when
        sharded), `config` (None: none) and `aux_files` (tokenizer files, by name; a
        config.json among them is skipped), and the manifest over all of them."""
        if len(self._writers) != len(self._shards):
            raise MergeError(f"{len(self._writers)} of {len(self._shards)} shards written")
        digests = {
            w.path.name: d.result() for w, d in zip(self._writers, self._digests, strict=True)
        }
        self._close_writers()
        directory = self._directory
        if len(self._shards) > 1:
            directory.write_file(INDEX_NAME, index_json(self._shards, {}))
        if config is not None:
            directory.write_file(CONFIG_NAME, config)
        for name, src in sorted(aux_files.items()):
            if name != CONFIG_NAME:
                directory.write_file(name, src.read_bytes())
        others = (p for p in sorted(directory.path.iterdir()) if p.name not in digests)
        written = digests | {p.name: sha256_file(p) for p in others}
        self._manifest = build_manifest(record, written)
        directory.write_file(MANIFEST_NAME, manifest_bytes(self._manifest))
        return self._manifest

    def _close_writers(self) -> None:
        for writer in self._writers:
            writer.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pool, self._finalizing = self._finalizing, None
        failed = exc_type is not None or self._manifest is None
        try:
            if failed:
                self._stop.set()
                for writer in self._writers:
                    writer.abort()
                wait(self._digests)
        finally:
            self._close_writers()
            if pool is not None:
                pool.shutdown(wait=True)
        if exc_type is None and self._manifest is None:
            self._directory.__exit__(MergeError, None, None)
            raise MergeError("the artifact was left unfinished; nothing was written")
        self._directory.__exit__(exc_type, exc, tb)


@contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A temporary sibling of `path`, fsynced and renamed over it only on success; it keeps
    the mode of the file it replaces (a new file: 0644, not mkstemp's 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), path.stat().st_mode & 0o7777 if path.exists() else 0o644)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
