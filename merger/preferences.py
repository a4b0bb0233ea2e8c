"""Preference data: the one pair type and its JSONL reader and writer.

A file holds one JSON object per line with `prompt`, `chosen` (the better response) and
`rejected`; other keys are ignored by `Preference` (generated data carries its labels,
`merger.recipe.prefdata.PrefPair`). Used by `warm-merge diagnose` and `finetune`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar, overload

from pydantic import BaseModel, ConfigDict, ValidationError

from merger.writer import atomic_file


class Preference(BaseModel):
    """One labelled comparison: `chosen` is the better response to `prompt` (extra keys ignored)."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    chosen: str
    rejected: str


P = TypeVar("P", bound=Preference)
FIELDS = tuple(Preference.model_fields)


@overload
def read_preferences(path: Path | str) -> list[Preference]: ...
@overload
def read_preferences(path: Path | str, kind: type[P]) -> list[P]: ...
def read_preferences(path: Path | str, kind: type[Preference] = Preference) -> list[Any]:
    """Every pair in a JSONL file, as `kind` (blank lines skipped); a ValueError names the
    file and line of the first bad one, or says the file holds none."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read preference data ({exc})") from exc
    pairs = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
            )
        try:
            pairs.append(kind.model_validate(record))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{path}:{lineno}: field {field}: {first['msg']}") from exc
    if not pairs:
        raise ValueError(f"{path}: no preference pairs (the file is empty)")
    return pairs


def preferences_bytes(pairs: Iterable[Preference]) -> bytes:
    """The JSONL of `pairs`, one JSON object per line, as `write_preferences` writes it."""
    return b"".join((pair.model_dump_json() + "\n").encode() for pair in pairs)


def pairs_sha256(pairs: Iterable[Preference]) -> str:
    """SHA-256 of the pairs as JSONL of prompt, chosen and rejected (other keys and the file's
    formatting left out): what names the data a model was calibrated on."""
    bare = (Preference.model_validate(p.model_dump(include=set(FIELDS))) for p in pairs)
    return hashlib.sha256(preferences_bytes(bare)).hexdigest()


def write_preferences(pairs: Iterable[Preference], path: Path | str) -> Path:
    """One JSON object per pair, written atomically: the file appears whole or not at all."""
    path = Path(path)
    with atomic_file(path) as fh:
        fh.write(preferences_bytes(pairs))
    return path
