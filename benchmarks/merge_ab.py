"""Interleaved A/B of `warm-merge build`: this checkout's code against another checkout's
(e.g. `git worktree add /tmp/base <commit>`), on merge_bench's workloads.

Run:  .venv/bin/python benchmarks/merge_ab.py --against DIR [--rounds N] [--full] [--only S]

Workloads (bench_workloads.py, written once into benchmarks/.work/ab/): A, M=3 perturbed
MiniLM copies (fp32), and B, M=3 synthetic bf16 Llama classifiers (~150 MB each, sharded;
--full: ~1.5 GB each), plus one more of each as the shared init. Each round builds every
variant (uniform, weighted, LITI, SLERP, bf16 output, small shards) with one checkout, then
the other, alternating which goes first, page cache warm; it reports the median wall time
per variant and checkout and their ratio, and checks that the two artifacts of every
variant are byte-identical file for file (a refactoring must not change a bit).
Printed only: the figures go into RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_workloads import LLAMA_FULL, LLAMA_QUICK, llama_workload, minilm_workload

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / ".work" / "ab"
PYTHON = REPO / ".venv" / "bin" / "python"


def variants(a: list[Path], a_init: Path, b: list[Path], b_init: Path) -> dict[str, list[str]]:
    """`warm-merge build` arguments (bar --out) of every variant."""
    sa, sb = [str(p) for p in a], [str(p) for p in b]
    return {
        "A uniform": sa,
        "A weights 1,2,3": [*sa, "--weights", "1,2,3"],
        "A liti 0.5": [*sa, "--init", str(a_init), "--liti", "0.5"],
        "A slerp": [*sa, "--init", str(a_init), "--method", "slerp"],
        "A bf16 out": [*sa, "--dtype", "bfloat16", "--weights", "3,1,1"],
        "A 20MB shards": [*sa, "--max-shard-size", "20MB"],
        "B uniform": sb,
        "B weights, fp32 out": [*sb, "--weights", "3,1,1", "--dtype", "float32"],
        "B liti 0.3": [*sb, "--init", str(b_init), "--liti", "0.3"],
        "B slerp, liti 0.7": [*sb, "--init", str(b_init), "--method", "slerp", "--liti", "0.7"],
    }


def build(code: Path, args: list[str], out: Path) -> float:
    """Wall seconds of one `warm-merge build` run with `code` first on the import path."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(code), HF_HUB_OFFLINE="1")
    argv = [str(PYTHON), "-m", "merger.cli", "build", *args, "--out", str(out), "--no-progress"]
    start = time.perf_counter()
    subprocess.run(argv, cwd=code, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file of an artifact, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--against", type=Path, required=True, help="the other checkout's root")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="~1.5 GB Llama members")
    parser.add_argument("--only", default="", help="run the variants whose name contains this")
    args = parser.parse_args()
    a = minilm_workload(WORK / "A", 4).members
    shape = LLAMA_FULL if args.full else LLAMA_QUICK
    b = llama_workload(WORK / ("B-full" if args.full else "B"), 4, shape).members
    runs = {
        name: argv
        for name, argv in variants(list(a[:3]), a[3], list(b[:3]), b[3]).items()
        if args.only in name
    }
    codes = {"this": REPO, "other": args.against.resolve()}
    times: dict[tuple[str, str], list[float]] = {}
    identical = {}
    for round_ in range(args.rounds):
        order = list(codes) if round_ % 2 == 0 else list(reversed(codes))
        for name, argv in runs.items():
            outs = {}
            for code in order:
                outs[code] = WORK / "out" / code
                seconds = build(codes[code], argv, outs[code])
                times.setdefault((name, code), []).append(seconds)
            identical[name] = identical.get(name, True) and (
                digests(outs["this"]) == digests(outs["other"])
            )
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"this: {REPO}\nother: {codes['other']}\n")
    print("| variant | this (s) | other (s) | this / other | byte-identical |")
    print("|---|---|---|---|---|")
    for name in runs:
        this = statistics.median(times[name, "this"])
        other = statistics.median(times[name, "other"])
        same = "yes" if identical[name] else "NO"
        print(f"| {name} | {this:.2f} | {other:.2f} | {this / other:.3f} | {same} |")
    shutil.rmtree(WORK / "out", ignore_errors=True)


if __name__ == "__main__":
    main()
