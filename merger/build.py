"""Plan and run a merge: inputs -> canonical order -> streamed chunks -> atomic artifact.

Memory stays flat in M and in model size: per averaging worker, one fp64 accumulator chunk
and one input chunk at a time, read with pread into buffers reused for the whole merge.
A background thread hashes the input files while the merge runs, then hashes each output
shard as it is written: the artifact is never read back for its manifest. Once the inputs
are hashed, the cores that hashing used average chunks too.
"""

from __future__ import annotations

import contextlib
import json
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

from merger import __version__
from merger.checkpoints import (
    CONFIG_NAME,
    Checkpoint,
    FileHashes,
    TensorInfo,
    TensorReader,
    check_compatible,
    open_checkpoint,
    sha256_file,
)
from merger.config import MergeSpec, Method
from merger.dtypes import CONFIG_DTYPE_NAMES, FLOATING, OUTPUT_DTYPES, itemsize, to_torch
from merger.errors import MergeError
from merger.manifest import (
    MANIFEST_NAME,
    PLACEHOLDER_SHA256,
    InputRecord,
    Manifest,
    MergeRecord,
    build_manifest,
    manifest_bytes,
    shard_metadata,
)
from merger.methods import (
    ACC_DTYPE,
    BufferPool,
    Rounder,
    accumulate,
    liti_weights,
    round_to,
    slerp_task_vectors,
)
from merger.writer import (
    INDEX_NAME,
    AtomicDirectory,
    PlannedTensor,
    ShardPlan,
    ShardWriter,
    index_json,
    plan_shards,
)

Progress = Callable[[int], None]


@dataclass(frozen=True)
class MergePlan:
    """A validated merge: members in canonical order, output tensors and shards."""

    spec: MergeSpec
    members: tuple[Checkpoint, ...]
    raw_weights: tuple[float, ...]  # as given (uniform: 1.0), aligned with members
    init: Checkpoint | None
    shards: tuple[ShardPlan, ...]

    @property
    def tensors(self) -> tuple[PlannedTensor, ...]:
        """Every output tensor, shard by shard in disk order."""
        return tuple(t for s in self.shards for t in s.tensors)

    @property
    def weights(self) -> tuple[float, ...]:
        """Member weights normalised to the simplex, aligned with members."""
        total = math.fsum(self.raw_weights)
        return tuple(w / total for w in self.raw_weights)

    @property
    def init_weight(self) -> float:
        """Normalised weight of init in a LITI average (0 when not interpolating)."""
        return 0.0 if self.spec.liti is None else 1.0 - self.spec.liti

    def positive_members(self) -> list[tuple[Checkpoint, float]]:
        """Members with a positive raw weight, in canonical order (zero weights are not read)."""
        return [(m, w) for m, w in zip(self.members, self.raw_weights, strict=True) if w > 0]

    def sources(self) -> list[tuple[Checkpoint, float]]:
        """The (input, raw weight) terms a floating tensor is read from, in summation order."""
        members = self.positive_members()
        if self.spec.method is Method.slerp:
            assert self.init is not None
            return [(self.init, 1.0), *members]
        if self.spec.liti is not None:
            assert self.init is not None
            init_w, member_w = liti_weights([w for _, w in members], self.spec.liti)
            head = [(self.init, init_w)] if init_w > 0 else []
            return head + [(m, w) for (m, _), w in zip(members, member_w, strict=True)]
        return members

    @property
    def bytes_to_read(self) -> int:
        """Tensor bytes read from the inputs."""
        return sum(ckpt.nbytes for ckpt, _ in self.sources())

    @property
    def bytes_to_write(self) -> int:
        """Tensor bytes written to the artifact."""
        return sum(s.nbytes for s in self.shards)


def plan_merge(spec: MergeSpec) -> MergePlan:
    """Open and check every input; fix the canonical order and the output layout."""
    opened = [open_checkpoint(p) for p in spec.inputs]
    # Canonical order: the result never depends on the order of the command-line arguments.
    raw = spec.weights or (1.0,) * len(opened)
    order = sorted(range(len(opened)), key=lambda i: (str(opened[i].path), raw[i]))
    members = tuple(opened[i] for i in order)
    raw_weights = tuple(raw[i] for i in order)
    init = open_checkpoint(spec.init) if spec.init is not None else None
    check_compatible(
        list(members),
        init,
        allow_multi_head=spec.allow_multi_head,
        ignore_config_keys=frozenset(spec.ignore_config_keys),
    )
    override = OUTPUT_DTYPES[spec.dtype] if spec.dtype is not None else None
    planned = [
        PlannedTensor(t.name, override if override and t.dtype in FLOATING else t.dtype, t.shape)
        for t in members[0].tensors.values()
    ]
    shards = tuple(plan_shards(planned, spec.max_shard_size))
    return MergePlan(spec, members, raw_weights, init, shards)


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
    """The weighted average of chunks, in buffers reused for the whole merge.

    Chunks are sized to stay in a core's cache across the M inputs; the arithmetic runs on
    one torch thread per averager. A chunk returned by `average` is valid until its next call.
    """

    def __init__(self, ctx: _Context) -> None:
        self._ctx = ctx
        self._buffers = BufferPool(ctx.plan.spec.chunk_elements)
        self._rounder = Rounder(self._buffers)
        self._terms = ctx.plan.sources()
        self._total = math.fsum(w for _, w in self._terms)

    def average(self, chunk: _Chunk) -> torch.Tensor:
        """The averaged, rounded chunk."""
        acc = self._buffers.get("acc", ACC_DTYPE, chunk.shape)
        promoted = self._buffers.get("promoted", ACC_DTYPE, chunk.shape)
        for i, (ckpt, weight) in enumerate(self._terms):
            info = ckpt.tensors[chunk.target.name]
            x = self._buffers.get("input", to_torch(info.dtype), chunk.shape)
            self._ctx.reader.read(info, chunk.rows, _bytes(x))
            accumulate(acc, x, weight, promoted, first=i == 0)
        out_dtype = to_torch(chunk.target.dtype)
        return self._rounder.round(acc, out_dtype, divisor=self._total, consume=True)

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
    that moment: while the inputs are being hashed, that hashing has a core (measured on 2
    cores: a second averaging thread beside the hashing made the merge slower, not faster).
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

    def lend(self, work: Callable[[], None], cancel: Callable[[], None]) -> None:
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
    # the largest tensor, still flat in M (members are folded in one at a time).
    plan = ctx.plan
    assert plan.init is not None
    base = ctx.read_whole(plan.init.tensors[target.name]).to(ACC_DTYPE)
    members = plan.positive_members()
    deltas = (ctx.read_whole(m.tensors[target.name]).to(ACC_DTYPE) - base for m, _ in members)
    result = slerp_task_vectors(deltas, [w for _, w in members])
    eta = 1.0 if plan.spec.liti is None else plan.spec.liti
    writer.write(target.name, round_to(base + eta * result, to_torch(target.dtype)), owned=True)


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


def _hash_inputs(
    ckpts: list[Checkpoint], hashes: FileHashes, stop: threading.Event
) -> dict[Path, dict[str, str]]:
    return {c.path: {f.name: hashes.get(f, stop) for f in c.files} for c in ckpts}


def _record(plan: MergePlan, hashes: dict[Path, dict[str, str]] | None) -> MergeRecord:
    def files(ckpt: Checkpoint) -> dict[str, str]:
        if hashes is None:
            return {f.name: PLACEHOLDER_SHA256 for f in ckpt.files}
        return hashes[ckpt.path]

    inputs = [
        InputRecord(path=str(m.path), weight=w, files=files(m))
        for m, w in zip(plan.members, plan.weights, strict=True)
    ]
    init = None
    if plan.init is not None:
        init = InputRecord(
            path=str(plan.init.path), weight=plan.init_weight, files=files(plan.init)
        )
    floating = sorted({t.dtype for t in plan.tensors if t.dtype in FLOATING})
    spec = plan.spec.model_dump(mode="json", exclude={"inputs", "init"})
    if plan.spec.weights is not None:
        spec["weights"] = list(plan.raw_weights)  # canonical order, like the inputs
    return MergeRecord(
        tool_version=__version__,
        method=plan.spec.method.value,
        weights=list(plan.weights),
        inputs=inputs,
        init=init,
        liti=plan.spec.liti,
        output_dtype=",".join(CONFIG_DTYPE_NAMES.get(d, d) for d in floating),
        config=spec,
    )


def _output_config(plan: MergePlan) -> bytes | None:
    config = plan.members[0].config
    if config is None:
        return None
    config = {k: v for k, v in config.items() if k != "_name_or_path"}
    if plan.spec.dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for key in keys:
            config[key] = plan.spec.dtype
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def _seal(
    writer: ShardWriter,
    plan: MergePlan,
    hashing: Future[dict[Path, dict[str, str]]],
    stop: threading.Event,
) -> str:
    # Queued behind the input hashing on the same thread, so their result is ready.
    return writer.seal(shard_metadata(_record(plan, hashing.result())), stop)


def _write_shard(
    ctx: _Context, averagers: _Averagers, shard: ShardPlan, writer: ShardWriter
) -> None:
    run: list[PlannedTensor] = []  # consecutive tensors to average
    for target in shard.tensors:
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
    earlier, e.g. before importing torch), then each output shard as it is written (see
    ShardWriter.seal). This thread reads, averages and writes, with helper threads on the
    other cores (the hashing's too, once the inputs are hashed); once the arithmetic is done,
    they all hash what inputs are left.
    """
    tick: Progress = progress or (lambda _n: None)
    inputs = [*plan.members, *([plan.init] if plan.init is not None else [])]
    stop = threading.Event()
    slerp = plan.spec.method is Method.slerp
    torch_threads = torch.get_num_threads() if slerp else 1
    helpers = 0 if slerp else min(_cores(), MAX_AVERAGING_THREADS) - 1
    with contextlib.ExitStack() as stack:
        if hashes is None:
            hashes = stack.enter_context(FileHashes(f for c in inputs for f in c.files))
        stack.enter_context(_torch_threads(torch_threads))
        background = stack.enter_context(
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm-merge-hash")
        )
        reader = stack.enter_context(TensorReader())
        tmp = stack.enter_context(AtomicDirectory(out, overwrite=overwrite))
        hashing = background.submit(_hash_inputs, inputs, hashes, stop)
        draft = shard_metadata(_record(plan, None))
        ctx = _Context(plan, reader, tick)
        averagers = _Averagers(ctx, helpers, lambda: _helpers_now(helpers, hashing))
        stack.callback(averagers.close)
        writers: list[ShardWriter] = []
        seals: list[Future[str]] = []
        try:
            for shard in plan.shards:
                writer = ShardWriter(tmp.path / shard.name, shard, draft)
                writers.append(writer)
                seals.append(background.submit(_seal, writer, plan, hashing, stop))
                _write_shard(ctx, averagers, shard, writer)
            averagers.lend(hashes.assist, hashes.cancel)  # arithmetic done: hash what is left
            digests = {w.path.name: seal.result() for w, seal in zip(writers, seals, strict=True)}
            record = _record(plan, hashing.result())
            hashes.check_unchanged(reader.opened)
        except BaseException:
            stop.set()
            hashes.cancel()
            for writer in writers:
                writer.abort()
            wait(seals)
            raise
        finally:
            for writer in writers:
                writer.close()
        if len(plan.shards) > 1:
            tmp.write_file(INDEX_NAME, index_json(plan.shards, {}))
        config = _output_config(plan)
        if config is not None:
            tmp.write_file(CONFIG_NAME, config)
        for name, src in sorted(plan.members[0].aux_files.items()):
            if name != CONFIG_NAME:
                tmp.write_file(name, src.read_bytes())
        others = (p for p in sorted(tmp.path.iterdir()) if p.name not in digests)
        written = digests | {p.name: sha256_file(p) for p in others}
        manifest = build_manifest(record, written)
        tmp.write_file(MANIFEST_NAME, manifest_bytes(manifest))
    return manifest
