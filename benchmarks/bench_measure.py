"""Measuring one child process: page-cache state, wall time, peak RSS, output bytes.

Wall time is taken until the output is durable: the child's own wall time plus an fsync
of every file it wrote (the I/O floor fsyncs itself, so every tool pays for the flush).
Peak RSS is the child's ru_maxrss from os.wait4 (KiB on Linux; it counts file pages the
child maps, e.g. safetensors mmaps, as well as anonymous memory). Linux folds the RSS of
the pre-exec process image into ru_maxrss, and a fork (or vfork) of this benchmark, which
holds torch and whole tensors, would start at its size: so every command is started and
waited for by a small launcher interpreter (python -I -S, about 10 MB), not from here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CHUNK = 8 << 20

# The I/O floor: read every input once, write and fsync an output of the merged size.
FLOOR_CODE = """
import os, sys
CHUNK = 8 << 20
out, size, *inputs = sys.argv[1:]
buf = bytearray(CHUNK)
for path in inputs:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
left = int(size)
block = memoryview(bytes(CHUNK))
while left:
    left -= os.write(fd, block[: min(left, CHUNK)])
os.fsync(fd)
os.close(fd)
"""

# Starts argv, waits with wait4, prints {"rc", "wall_s", "maxrss_kib"} as JSON.
LAUNCHER_CODE = """
import json, os, subprocess, sys, time
log, *argv = sys.argv[1:]
with open(log, "w") as f:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
rc = os.waitstatus_to_exitcode(status)
print(json.dumps({"rc": rc, "wall_s": wall, "maxrss_kib": usage.ru_maxrss}))
"""


@dataclass(frozen=True)
class ChildRun:
    """One measured child process."""

    wall_s: float  # until the output is on disk
    peak_rss_mb: float


class ChildFailed(RuntimeError):
    """A measured command exited non-zero."""


def files_under(paths: Iterable[Path]) -> list[Path]:
    """Every regular file in the given files and directories, sorted."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            out.append(p)
    return out


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of one HF model directory."""
    return sorted(model_dir.glob("*.safetensors"))


def total_bytes(files: Iterable[Path]) -> int:
    """Sum of file sizes."""
    return sum(f.stat().st_size for f in files)


def warm_cache(files: Iterable[Path]) -> None:
    """Read every file once so that it sits in the page cache."""
    buf = bytearray(CHUNK)
    for path in files:
        with path.open("rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def drop_cache(files: Iterable[Path]) -> None:
    """Evict the files' pages from the page cache (drop_caches needs root on the host)."""
    os.sync()  # DONTNEED only drops clean pages
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(files: Sequence[Path]) -> int | None:
    """Bytes of the files now in the page cache, from util-linux fincore (None if absent)."""
    fincore = shutil.which("fincore")
    if fincore is None or not files:
        return None
    res = subprocess.run(
        [fincore, "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, files)],
        capture_output=True,
        text=True,
        check=True,
    )
    return sum(int(line) for line in res.stdout.split())


def fsync_tree(root: Path) -> None:
    """fsync every file under root, and the directories, so that the output is durable."""
    for path in [*files_under([root]), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def run_child(
    argv: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    output: Path | None = None,
) -> ChildRun:
    """Run argv to completion; wall time (plus fsync of output) and its peak RSS."""
    log.parent.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER_CODE, str(log), *argv]
    res = subprocess.run(launcher, env=env, capture_output=True, text=True, check=True)
    report = json.loads(res.stdout)
    if report["rc"] != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise ChildFailed(f"{' '.join(argv)} exited {report['rc']}; log {log}:\n{tail}")
    t0 = time.perf_counter()
    if output is not None and output.exists():
        fsync_tree(output)
    wall = report["wall_s"] + time.perf_counter() - t0
    return ChildRun(wall_s=wall, peak_rss_mb=report["maxrss_kib"] / 1024)


def run_floor(inputs: Sequence[Path], out_file: Path, size: int, log: Path) -> ChildRun:
    """The I/O floor for reading `inputs` and writing `size` bytes."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-c", FLOOR_CODE, str(out_file), str(size), *map(str, inputs)]
    return run_child(argv, log)


def baseline_rss_mb(python: Path, module: str, log: Path, repeats: int = 3) -> ChildRun:
    """Median wall and peak RSS of a child that only imports `module` (no work)."""
    runs = [run_child([str(python), "-c", f"import {module}"], log) for _ in range(repeats)]
    runs.sort(key=lambda r: r.peak_rss_mb)
    walls = sorted(r.wall_s for r in runs)
    return ChildRun(wall_s=walls[len(walls) // 2], peak_rss_mb=runs[len(runs) // 2].peak_rss_mb)
