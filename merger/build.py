"""Run a planned merge: streamed chunks through `merger.methods` into an `ArtifactWriter`.

Memory stays flat in M and in model size: per averaging thread, one fp64 accumulator chunk
and one input chunk at a time, read with pread into buffers reused for the whole merge.
The inputs are hashed (`FileHashes`) while the merge runs and each output shard as it is
written (`ArtifactWriter`): the artifact is never read back for its manifest. Once the
inputs are hashed, the core that hashing used averages chunks too.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merger.checkpoints import TensorInfo, TensorReader
from merger.config import Method
from merger.dtypes import FLOATING, itemsize, to_torch
from merger.errors import MergeError
from merger.hashing import FileHashes
from merger.manifest import Manifest
from merger.methods import BufferPool, average, slerp_merge
from merger.plan import InputHashes, MergePlan, output_config, provenance
from merger.writer import ArtifactWriter, PlannedTensor, ShardWriter

Progress = Callable[[int], None]


def _row_chunks(info: TensorInfo, chunk_elements: int) -> Iterator[tuple[int, int] | None]:
    """Row ranges of at most ~chunk_elements elements; None means the whole tensor at once."""
    if len(info.shape) == 0 or info.numel <= chunk_elements:
        yield None
        return
    row = info.numel // info.shape[0]
    step = max(1, chunk_elements // max(row, 1))
    for start in range(0, info.shape[0], step):
        yield start, min(start + step, info.shape[0])


def _bytes(t: torch.Tensor) -> memoryview:
    return t.view(-1).view(torch.uint8).numpy().data


@dataclass
class _Context:
    plan: MergePlan
    reader: TensorReader
    progress: Progress

    def read_whole(self, info: TensorInfo) -> torch.Tensor:
        """A whole input tensor in a fresh tensor of its own dtype."""
        out = torch.empty(info.shape, dtype=to_torch(info.dtype))
        self.reader.read(info, None, _bytes(out))
        self.progress(out.nbytes)
        return out


@dataclass(frozen=True)
class _Chunk:
    """Rows [start, stop) of one output tensor (None: the whole tensor)."""

    target: PlannedTensor
    rows: tuple[int, int] | None
    shape: tuple[int, ...]


class _Averager:
    """`methods.average` over chunks, read into buffers reused for the whole merge.

    Chunks are sized to stay in a core's cache across the M inputs; the arithmetic runs on
    one torch thread per averager. A chunk returned by `average` is valid until its next call.
    """

    def __init__(self, ctx: _Context) -> None:
        self._ctx = ctx
        self._buffers = BufferPool(ctx.plan.spec.chunk_elements)
        self._terms = ctx.plan.sources()
        self._weights = [w for _, w in self._terms]

    def average(self, chunk: _Chunk) -> torch.Tensor:
        """The averaged chunk, correctly rounded to its output dtype."""
        return average(
            self._read(chunk), self._weights, to_torch(chunk.target.dtype), self._buffers
        )

    def _read(self, chunk: _Chunk) -> Iterator[torch.Tensor]:
        """Each term's rows of the chunk, in turn, in one reused buffer per dtype."""
        for ckpt, _ in self._terms:
            info = ckpt.tensors[chunk.target.name]
            x = self._buffers.get("input", to_torch(info.dtype), chunk.shape)
            self._ctx.reader.read(info, chunk.rows, _bytes(x))
            yield x

    def input_bytes(self, chunk: _Chunk) -> int:
        """Bytes `average` reads for `chunk`."""
        n = math.prod(chunk.shape)
        return sum(n * itemsize(ckpt.tensors[chunk.target.name].dtype) for ckpt, _ in self._terms)


def _chunks(plan: MergePlan, targets: list[PlannedTensor]) -> list[_Chunk]:
    out = []
    for target in targets:
        info = plan.members[0].tensors[target.name]
        for rows in _row_chunks(info, plan.spec.chunk_elements):
            shape = info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])
            out.append(_Chunk(target, rows, shape))
    return out


class _Averagers:
    """Averages runs of tensors on this thread and on helper threads, writing in order.

    Helpers take the chunks after this thread's, one each, as many as `allowed()` says at
    that moment: while the inputs are being hashed, that hashing keeps a core (an averaging
    thread beside it would compete for the same core and slow the merge).
    """

    def __init__(self, ctx: _Context, helpers: int, allowed: Callable[[], int]) -> None:
        self._ctx = ctx
        self._mine = _Averager(ctx)
        self._theirs = [_Averager(ctx) for _ in range(helpers)]
        self._allowed = allowed
        self._pool = ThreadPoolExecutor(max(1, helpers), thread_name_prefix="warm-merge-average")

    def write(self, targets: list[PlannedTensor], writer: ShardWriter) -> None:
        """Average `targets` (consecutive tensors of writer's shard) and append them."""
        chunks = _chunks(self._ctx.plan, targets)
        i = 0
        while i < len(chunks):
            n = min(len(self._theirs), max(0, self._allowed()), len(chunks) - i - 1)
            group = chunks[i + 1 : i + 1 + n]
            futures = [
                self._pool.submit(av.average, c) for av, c in zip(self._theirs, group, strict=False)
            ]
            try:
                self._emit(writer, chunks[i], self._mine.average(chunks[i]))
                for chunk, future in zip(group, futures, strict=True):
                    self._emit(writer, chunk, future.result())
            finally:
                wait(futures)  # no helper touches its buffers, or the reader, after a failure
            i += 1 + n

    def _emit(self, writer: ShardWriter, chunk: _Chunk, data: torch.Tensor) -> None:
        writer.write(chunk.target.name, data)
        self._ctx.progress(self._mine.input_bytes(chunk))

    def run_on_all(self, work: Callable[[], None], cancel: Callable[[], None]) -> None:
        """Run `work` on this thread and on every helper at once (it shares itself out);
        if this thread fails or is interrupted, `cancel` stops the helpers' share."""
        futures = [self._pool.submit(work) for _ in self._theirs]
        try:
            work()
        except BaseException:
            cancel()
            raise
        finally:
            wait(futures)
        for future in futures:
            future.result()

    def close(self) -> None:
        """Stop the helper threads (none is running a chunk outside `write`)."""
        self._pool.shutdown(wait=True)


def _merge_slerp(ctx: _Context, target: PlannedTensor, writer: ShardWriter) -> None:
    # SLERP needs whole-tensor norms, so it reads whole tensors; memory is a few copies of
    # the largest tensor, still flat in M (members are read and folded in one at a time).
    plan = ctx.plan
    assert plan.init is not None
    init = ctx.read_whole(plan.init.tensors[target.name])
    members = plan.positive_members()
    merged = slerp_merge(
        init,
        (ctx.read_whole(m.tensors[target.name]) for m, _ in members),
        [w for _, w in members],
        to_torch(target.dtype),
        eta=1.0 if plan.spec.liti is None else plan.spec.liti,
    )
    writer.write(target.name, merged, owned=True)


def _copy_exact(ctx: _Context, target: PlannedTensor, writer: ShardWriter) -> None:
    # Integer and boolean tensors (buffers, masks) are not averaged: they must agree.
    members = [m for m, _ in ctx.plan.positive_members()]
    first = ctx.read_whole(members[0].tensors[target.name])
    for other in members[1:]:
        if not torch.equal(first, ctx.read_whole(other.tensors[target.name])):
            raise MergeError(
                f"{other.tensors[target.name].file}: {target.dtype} tensor {target.name} differs "
                f"from {members[0].tensors[target.name].file}; non-floating tensors must be equal"
            )
    writer.write(target.name, first, owned=True)


def _hash_inputs(plan: MergePlan, hashes: FileHashes, stop: threading.Event) -> InputHashes:
    return {c.path: {f.name: hashes.get(f, stop) for f in c.files} for c in plan.inputs}


def _write_shard(ctx: _Context, averagers: _Averagers, writer: ShardWriter) -> None:
    run: list[PlannedTensor] = []  # consecutive tensors to average
    for target in writer.shard.tensors:
        if target.dtype in FLOATING and ctx.plan.spec.method is not Method.slerp:
            run.append(target)
            continue
        averagers.write(run, writer)
        run = []
        if target.dtype not in FLOATING:
            _copy_exact(ctx, target, writer)
        else:
            _merge_slerp(ctx, target, writer)
    averagers.write(run, writer)
    writer.complete()


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# Averaging threads at most (this one and helpers): the arithmetic is memory-bound beyond.
MAX_AVERAGING_THREADS = 8


def _helpers_now(helpers: int, hashing: Future[Any]) -> int:
    """Averaging helpers to use now: all once the inputs are hashed, one fewer before."""
    return helpers if hashing.done() else helpers - 1


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_merge(
    plan: MergePlan,
    out: Path,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    hashes: FileHashes | None = None,
) -> Manifest:
    """Write the artifact for `plan` atomically into `out`; return its manifest.

    The inputs are hashed on a background thread (`hashes`, when the caller started one
    earlier, e.g. before importing torch), and each output shard as it is written (by the
    `ArtifactWriter`). This thread reads, averages and writes, with helper threads on the
    other cores (the hashing's too, once the inputs are hashed); once the arithmetic is done,
    they all hash what inputs are left.
    """
    tick: Progress = progress or (lambda _n: None)
    stop = threading.Event()
    slerp = plan.spec.method is Method.slerp
    torch_threads = torch.get_num_threads() if slerp else 1
    helpers = 0 if slerp else min(_cores(), MAX_AVERAGING_THREADS) - 1
    with contextlib.ExitStack() as stack:
        if hashes is None:
            hashes = stack.enter_context(FileHashes(f for c in plan.inputs for f in c.files))
        stack.enter_context(_torch_threads(torch_threads))
        background = stack.enter_context(
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm-merge-hash")
        )
        reader = stack.enter_context(TensorReader())
        hashing = background.submit(_hash_inputs, plan, hashes, stop)
        artifact = stack.enter_context(
            ArtifactWriter(
                out,
                plan.shards,
                provenance(plan, None),
                lambda: provenance(plan, hashing.result()),
                overwrite=overwrite,
            )
        )
        ctx = _Context(plan, reader, tick)
        averagers = _Averagers(ctx, helpers, lambda: _helpers_now(helpers, hashing))
        stack.callback(averagers.close)
        try:
            for shard in plan.shards:
                _write_shard(ctx, averagers, artifact.open_shard(shard))
            averagers.run_on_all(hashes.hash_pending, hashes.cancel)  # arithmetic done
            record = provenance(plan, hashing.result())
            hashes.check_unchanged(reader.opened)
            return artifact.finish(record, output_config(plan), plan.members[0].aux_files)
        except BaseException:
            stop.set()
            hashes.cancel()  # before the artifact waits for its shards' final records
            raise
