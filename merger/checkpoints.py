"""Read and verify merge inputs: HF model dirs or bare .safetensors files, never pickles.

Imports nothing heavy (no torch): the CLI finds and starts hashing the input files while
torch is still being imported.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from merger.dtypes import itemsize
from merger.errors import MergeError
from merger.hashing import FileIdentity, file_identity

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Files that make up a tokenizer; copied into the artifact and required byte-identical.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
# config.json keys that may differ between members without changing the model.
VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype"})
# The output projection of a sequence-classification head, by architecture family.
HEAD_OUTPUT_TENSORS = (
    "score.weight",
    "classifier.out_proj.weight",
    "classifier.weight",
    "v_head.weight",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CONVERT_HINT = (
    "warm-merge never unpickles; convert it once in a trusted environment with "
    "AutoModelForSequenceClassification.from_pretrained(DIR).save_pretrained(OUT) "
    "(safetensors is the default)"
)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is."""

    name: str
    dtype: str  # safetensors spelling, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in `file`

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Checkpoint:
    """One merge input: its tensors, its config (dirs only) and its tokenizer files."""

    path: Path
    weight_files: tuple[Path, ...]
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] | None = None
    aux_files: dict[str, Path] = field(default_factory=dict)  # config + tokenizer, by name

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file this input contributes (hashed for provenance), in a stable order."""
        return _provenance_files(self.path, self.weight_files, self.aux_files)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data."""
        return sum(t.numel * itemsize(t.dtype) for t in self.tensors.values())


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one .safetensors file (header only, no tensor data read).

    safetensors validates the file (offsets contiguous and in bounds); the data offsets, which
    its API does not expose, come from the same JSON header and are cross-checked against it.
    """
    try:
        with safe_open(str(path), framework="numpy") as fh:  # "pt" would import torch
            validated = {
                name: (fh.get_slice(name).get_dtype(), tuple(fh.get_slice(name).get_shape()))
                for name in fh.keys()  # noqa: SIM118 - safe_open is not a Mapping
            }
        with path.open("rb") as raw:
            size = int.from_bytes(raw.read(8), "little")
            header = json.loads(raw.read(size))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise MergeError(f"{path}: not a readable safetensors file ({exc})") from exc
    out = {}
    for name, (dtype, shape) in validated.items():
        entry = header[name]
        if entry["dtype"] != dtype or tuple(entry["shape"]) != shape:
            raise MergeError(f"{path}: header of tensor {name} is inconsistent")
        out[name] = TensorInfo(name, dtype, shape, path, 8 + size + entry["data_offsets"][0])
    return out


class TensorReader:
    """Reads tensor rows with pread into caller-owned buffers; one descriptor per file.

    Unlike safe_open's memory map, nothing stays resident in this process after a read (peak
    memory stays flat in M and model size) and no page faults are taken per chunk.
    Safe to share between threads reading into different buffers.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._opening = threading.Lock()
        self.opened: dict[Path, FileIdentity] = {}  # each file as it was when opened

    def read(self, info: TensorInfo, rows: tuple[int, int] | None, out: memoryview) -> None:
        """Fill `out` (a C-contiguous buffer of exactly those bytes) with rows [start, stop)
        of the tensor, or all of it."""
        rows_in = info.shape[0] if info.shape else 0
        row_bytes = info.numel // rows_in * itemsize(info.dtype) if rows_in else 0
        start = info.offset + (rows[0] * row_bytes if rows is not None else 0)
        view = out.cast("B")
        fd = self._fds.get(info.file)
        if fd is None:
            with self._opening:
                fd = self._fds.get(info.file)
                if fd is None:
                    fd = os.open(info.file, os.O_RDONLY)
                    self.opened[info.file] = file_identity(os.fstat(fd))
                    self._fds[info.file] = fd
        done = 0
        while done < view.nbytes:
            n = os.preadv(fd, [view[done:]], start + done)
            if n == 0:
                raise MergeError(f"{info.file}: truncated inside tensor {info.name}")
            done += n

    def close(self) -> None:
        """Close every descriptor."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _refuse_pickle(path: Path) -> None:
    raise MergeError(f"{path}: pickle checkpoint refused; {CONVERT_HINT}")


def _weight_files(directory: Path) -> tuple[Path, ...]:
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise MergeError(f"{index}: not a safetensors index ({exc})") from exc
        files = sorted({directory / str(f) for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise MergeError(f"{index}: shard {f.name} is missing")
        return tuple(files)
    if (directory / SINGLE_NAME).is_file():
        return (directory / SINGLE_NAME,)
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise MergeError(f"{directory / pickles[0]}: pickle checkpoint refused; {CONVERT_HINT}")
    raise MergeError(f"{directory}: no {SINGLE_NAME} or {INDEX_NAME}")


def _aux_files(directory: Path) -> dict[str, Path]:
    return {n: directory / n for n in (CONFIG_NAME, *TOKENIZER_FILES) if (directory / n).is_file()}


def _provenance_files(
    path: Path, weight_files: Iterable[Path], aux_files: dict[str, Path]
) -> tuple[Path, ...]:
    index = [path / INDEX_NAME] if (path / INDEX_NAME).is_file() else []
    aux = [aux_files[k] for k in sorted(aux_files)]
    return (*sorted(weight_files), *index, *aux)


def input_files(path: Path) -> tuple[Path, ...]:
    """The files `open_checkpoint(path).files` will list, found without reading a header.

    Raises the MergeError open_checkpoint would for a missing path, a pickle, a file that is
    not .safetensors or a directory without weights (not those that need the headers).
    """
    path = _resolve_input(path)
    if path.is_file():
        return (path,)
    return _provenance_files(path, _weight_files(path), _aux_files(path))


def _resolve_input(path: Path) -> Path:
    path = path.expanduser().resolve()
    if not path.exists():
        raise MergeError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise MergeError(f"{path}: expected a model directory or a .safetensors file")
    return path


def _check_index(directory: Path, tensors: dict[str, TensorInfo]) -> None:
    index = directory / INDEX_NAME
    if not index.is_file():
        return
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    for name, info in tensors.items():
        if weight_map.get(name) != info.file.name:
            raise MergeError(f"{index}: tensor {name} is in {info.file.name}, not in the index")
    for name, file in weight_map.items():
        if name not in tensors:
            raise MergeError(f"{index}: tensor {name} listed for {file} is not in that shard")


def open_checkpoint(path: Path) -> Checkpoint:
    """Resolve one input and read its headers, config and tokenizer files."""
    path = _resolve_input(path)
    if path.is_file():
        return Checkpoint(path, (path,), read_header(path))
    files = _weight_files(path)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in tensors:
                raise MergeError(f"{f}: tensor {name} also stored in {tensors[name].file.name}")
            tensors[name] = info
    _check_index(path, tensors)
    aux = _aux_files(path)
    config = None
    if CONFIG_NAME in aux:
        try:
            config = json.loads(aux[CONFIG_NAME].read_text())
        except ValueError as exc:
            raise MergeError(f"{aux[CONFIG_NAME]}: invalid JSON ({exc})") from exc
    return Checkpoint(path, files, tensors, config, aux)


def num_outputs(ckpt: Checkpoint) -> int:
    """The classification head's output count; raises if the input has no head."""
    for name in HEAD_OUTPUT_TENSORS:
        info = ckpt.tensors.get(name)
        if info is not None and len(info.shape) == 2:
            return info.shape[0]
    raise MergeError(
        f"{ckpt.path}: no classification head (looked for {', '.join(HEAD_OUTPUT_TENSORS)}); "
        "a reward model is a *ForSequenceClassification checkpoint"
    )


def _config_num_labels(config: dict[str, Any]) -> int:
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))  # transformers' default when id2label is absent


def check_reward_model(ckpt: Checkpoint, *, allow_multi_head: bool) -> None:
    """The reward-model contract: a sequence-classification head, one output unless allowed."""
    heads = num_outputs(ckpt)
    if ckpt.config is not None:
        where = ckpt.path / CONFIG_NAME
        arch = ckpt.config.get("architectures") or []
        if not arch or not all(str(a).endswith("ForSequenceClassification") for a in arch):
            raise MergeError(
                f"{where}: architectures is {arch}, expected a *ForSequenceClassification model"
            )
        labels = _config_num_labels(ckpt.config)
        if labels != heads:
            raise MergeError(f"{where}: num_labels is {labels} but the head has {heads} outputs")
    if heads != 1 and not allow_multi_head:
        raise MergeError(
            f"{ckpt.path}: head has {heads} outputs (num_labels={heads}); a reward model has 1 "
            "(pass --allow-multi-head to merge multi-head reward models)"
        )


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            where = f"{prefix}.{key}" if prefix else key
            if key not in a or key not in b:
                return where
            diff = _first_difference(a[key], b[key], where)
            if diff is not None:
                return diff
        return None
    return None if a == b else prefix


def check_same_tensors(ref: Checkpoint, other: Checkpoint, *, role: str = "input") -> None:
    """Identical tensor names, shapes and dtypes, or a MergeError naming the tensor."""
    for name in sorted(set(ref.tensors) | set(other.tensors)):
        a, b = ref.tensors.get(name), other.tensors.get(name)
        if a is None or b is None:
            has, lacks = (ref, other) if b is None else (other, ref)
            raise MergeError(f"{lacks.path}: tensor {name} is missing ({role}; {has.path} has it)")
        if a.shape != b.shape:
            raise MergeError(
                f"{b.file}: tensor {name} has shape {list(b.shape)}, {a.file} has {list(a.shape)}"
            )
        if a.dtype != b.dtype:
            raise MergeError(f"{b.file}: tensor {name} is {b.dtype}, {a.file} has {a.dtype}")


def check_same_config(ref: Checkpoint, other: Checkpoint, ignore: frozenset[str]) -> None:
    """config.json equal up to volatile fields and the keys the user chose to ignore."""
    if ref.config is None or other.config is None:
        return
    skip = VOLATILE_CONFIG_KEYS | ignore
    a = {k: v for k, v in ref.config.items() if k not in skip}
    b = {k: v for k, v in other.config.items() if k not in skip}
    diff = _first_difference(a, b)
    if diff is not None:
        top = diff.split(".")[0]
        raise MergeError(
            f"{other.path / CONFIG_NAME}: field {diff} differs from {ref.path / CONFIG_NAME} "
            f"({_lookup(b, diff)!r} vs {_lookup(a, diff)!r}); if it only affects training, "
            f"pass --ignore-config-key {top}"
        )


def _lookup(d: dict[str, Any], dotted: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return "<absent>"
        cur = cur[part]
    return cur


def check_same_tokenizer(ref: Checkpoint, other: Checkpoint) -> None:
    """Tokenizer files present in the same set and byte-identical."""
    names_a = {n for n in ref.aux_files if n != CONFIG_NAME}
    names_b = {n for n in other.aux_files if n != CONFIG_NAME}
    for name in sorted(names_a ^ names_b):
        has, lacks = (ref, other) if name in names_a else (other, ref)
        raise MergeError(f"{lacks.path}: tokenizer file {name} is missing ({has.path} has it)")
    for name in sorted(names_a):
        if ref.aux_files[name].read_bytes() != other.aux_files[name].read_bytes():
            raise MergeError(f"{other.aux_files[name]}: differs from {ref.aux_files[name]}")


def check_compatible(
    members: list[Checkpoint],
    init: Checkpoint | None,
    *,
    allow_multi_head: bool,
    ignore_config_keys: frozenset[str] = frozenset(),
) -> None:
    """Every strictness rule across members (and init): raise on the first violation."""
    kinds = {m.path.is_dir() for m in members}
    if len(kinds) > 1:
        raise MergeError("inputs mix model directories and bare .safetensors files; use one kind")
    ref = members[0]
    for ckpt in members:
        check_reward_model(ckpt, allow_multi_head=allow_multi_head)
    for other in members[1:]:
        check_same_tensors(ref, other)
        check_same_config(ref, other, ignore_config_keys)
        check_same_tokenizer(ref, other)
    if init is not None:
        check_same_tensors(ref, init, role="init")
        check_same_config(ref, init, ignore_config_keys)
