"""The WARM artifact format's one owner: provenance records, the manifest file, verification.

An artifact is a Hugging Face model directory (config.json, tokenizer files, safetensors
shards) plus `warm_manifest.json`: how it was merged (method, weights, every input file's
SHA-256, output dtype, tool version, merge config) and the SHA-256 of every artifact file.
Each shard's safetensors `__metadata__` carries the same merge record.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open

from merger.errors import MergeError, VerifyError
from merger.hashing import sha256_file

FORMAT = "warm-rm.artifact/1"
MANIFEST_NAME = "warm_manifest.json"
META_FORMAT_KEY = "warm_rm.format"
META_MERGE_KEY = "warm_rm.merge"
PLACEHOLDER_SHA256 = "0" * 64  # same length as a real digest: headers keep their size


class InputRecord(BaseModel):
    """One merge input as it was read."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(description="Absolute path given to the merger.")
    weight: float = Field(description="Normalised weight of this input in the merge.")
    files: dict[str, str] = Field(description="File name (relative to path) -> SHA-256.")


class MergeRecord(BaseModel):
    """How an artifact was made: enough to reproduce it byte for byte."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tool: str = "warm-merge"
    tool_version: str
    method: str
    weights: list[float] = Field(description="Normalised member weights, in input order.")
    inputs: list[InputRecord] = Field(description="Members in canonical (sorted) order.")
    init: InputRecord | None = None
    liti: float | None = None
    output_dtype: str = Field(description="Floating output dtype(s), e.g. 'bfloat16'.")
    config: dict[str, Any] = Field(description="The merge spec as validated.")


class Manifest(BaseModel):
    """The content of warm_manifest.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = FORMAT
    merge: MergeRecord
    files: dict[str, str] = Field(description="Artifact file name -> SHA-256.")
    fingerprint: str = Field(description="SHA-256 over the sorted (file, SHA-256) pairs.")


def compute_fingerprint(files: dict[str, str]) -> str:
    """One hash naming the artifact's exact content (used by the service and clients)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()


def merge_json(record: MergeRecord) -> str:
    """Canonical JSON of a merge record (sorted keys, no whitespace)."""
    return json.dumps(record.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def shard_metadata(record: MergeRecord) -> dict[str, str]:
    """The safetensors __metadata__ of every output shard."""
    return {"format": "pt", META_FORMAT_KEY: FORMAT, META_MERGE_KEY: merge_json(record)}


def build_manifest(record: MergeRecord, files: dict[str, str]) -> Manifest:
    """The manifest for an artifact whose files hash to `files`."""
    ordered = dict(sorted(files.items()))
    return Manifest(merge=record, files=ordered, fingerprint=compute_fingerprint(ordered))


def manifest_bytes(manifest: Manifest) -> bytes:
    """Deterministic serialisation of a manifest."""
    return (json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def read_manifest(directory: Path) -> Manifest:
    """Load and validate an artifact's manifest."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise MergeError(f"{path}: missing (not a WARM artifact)")
    return read_record(path, Manifest, "manifest", FORMAT)


R = TypeVar("R", bound=BaseModel)


def read_record(path: Path, kind: type[R], what: str, expected: str) -> R:
    """The JSON file `path` as a `kind` whose `format` field is `expected`; a MergeError names
    the file and the first invalid field, or the format found."""
    try:
        record = kind.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MergeError(f"{path}: invalid {what} at {where or 'root'}: {first['msg']}") from exc
    found = getattr(record, "format", None)
    if found != expected:
        raise MergeError(f"{path}: format {found!r}, this tool reads {expected!r}")
    return record


def verify_artifact(directory: Path, ignoring: frozenset[str] = frozenset()) -> Manifest:
    """Re-hash every artifact file against the manifest; raise VerifyError on any mismatch.
    Files named in `ignoring` are not checked, listed or not (a calibration about to be
    replaced)."""
    directory = directory.expanduser().resolve()
    manifest = read_manifest(directory)
    problems: list[str] = []
    for name, expected in manifest.files.items():
        if name in ignoring:
            continue
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif (actual := sha256_file(path)) != expected:
            problems.append(f"{path}: SHA-256 {actual[:16]}... != manifest {expected[:16]}...")
    present = {p.name for p in directory.iterdir()} - {MANIFEST_NAME} - ignoring
    problems += [
        f"{directory / n}: not listed in the manifest"
        for n in sorted(present - set(manifest.files))
    ]
    if compute_fingerprint(manifest.files) != manifest.fingerprint:
        problems.append(f"{directory / MANIFEST_NAME}: fingerprint does not match its file list")
    expected_meta = merge_json(manifest.merge)
    for name in sorted(manifest.files):
        path = directory / name
        if name.endswith(".safetensors") and path.is_file():
            problems += _check_shard_metadata(path, expected_meta)
    if problems:
        raise VerifyError("\n".join(problems))
    return manifest


def _check_shard_metadata(path: Path, expected: str) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # safetensors' own error types
        return [f"{path}: unreadable safetensors header ({exc})"]
    if meta.get(META_MERGE_KEY) != expected:
        return [f"{path}: merge record in the header differs from the manifest"]
    return []
