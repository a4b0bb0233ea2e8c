"""Benchmark `warm-merge build` against the I/O floor and against mergekit 0.1.5.

Run:  .venv/bin/python benchmarks/merge_bench.py [--quick] [--repeats N]

Workloads (generated once into benchmarks/.work/, see bench_workloads.py):
  A  M perturbed copies of the packaged MiniLM with a 1-label head, fp32 (M=6; --quick: 3)
  B  M=4 synthetic LlamaForSequenceClassification checkpoints, bf16, ~1.5 GB each in
     ~500 MB shards (--quick: ~150 MB each)

For each workload and each page-cache state, one after another in the same run:
  warm  every input file read once just before each measured command
  cold  os.sync(), then posix_fadvise(DONTNEED) on every input and output file
the script measures
  1. the I/O floor: a child that reads every input safetensors file once (8 MB reads)
     and writes and fsyncs an output of the merged size;
  2. `warm-merge build` (uniform average): wall time, and peak RSS above the baseline of
     a child that only imports what a merge runs on (`import merger.build`: torch, safetensors);
  3. mergekit 0.1.5 `linear` merge (own virtualenv in benchmarks/.envs/mergekit), with
     dtype = out_dtype = the inputs' dtype: wall time, peak RSS above `import mergekit.merge`.
Wall time runs until the output is durable (child wall + fsync of what it wrote; the
floor fsyncs itself). Peak RSS is ru_maxrss from os.wait4, taken by a small launcher
process (see bench_measure.py for why). With --repeats N the three commands run
interleaved N times and the medians are reported.
Then 4. equality: our output against mergekit's `dtype: float32` linear merge, tensor by
tensor, in ulps of the output dtype (and both against the fp64 average rounded once),
listing any tensor mergekit skipped or shaped differently; and 5. our peak extra RSS on A
at M = 2, 4, 6 and on B, to show whether memory stays flat in M and in model size.

The tables are printed and appended, with the date, command and machine, to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import bench_mergekit as mergekit
from bench_compare import compare_dirs
from bench_measure import (
    ChildRun,
    baseline_rss_mb,
    drop_cache,
    files_under,
    resident_bytes,
    run_child,
    run_floor,
    safetensors_files,
    total_bytes,
    warm_cache,
)
from bench_report import (
    Baselines,
    Results,
    Row,
    ScanPoint,
    machine_description,
    publish,
    render,
)
from bench_workloads import LLAMA_FULL, LLAMA_QUICK, Workload, llama_workload, minilm_workload

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORK = BENCH_DIR / ".work"
LOGS = WORK / "logs"
RESULTS = BENCH_DIR / "RESULTS.md"
OUR_PYTHON = REPO / ".venv" / "bin" / "python"
WARM_MERGE = REPO / ".venv" / "bin" / "warm-merge"
MB = 1 << 20
CACHE_STATES = ("warm", "cold")


def child_env() -> dict[str, str]:
    """Environment for every child: offline, CPU only."""
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")


def input_files(wl: Workload) -> list[Path]:
    """Every file of every member (weights, config, tokenizer)."""
    return files_under(wl.members)


def weight_files(wl: Workload) -> list[Path]:
    """The safetensors files of every member."""
    return [f for m in wl.members for f in safetensors_files(m)]


def prepare_cache(cache: str, inputs: Sequence[Path], outputs: Sequence[Path]) -> None:
    """Put the page cache in the named state before a measured command."""
    if cache == "warm":
        warm_cache(inputs)
    else:
        drop_cache([*inputs, *files_under(outputs)])


def run_ours(wl: Workload, out: Path, log: Path) -> ChildRun:
    """`warm-merge build` with its defaults (uniform average, inputs' dtype)."""
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(WARM_MERGE), "build", *map(str, wl.members), "--out", str(out), "--no-progress"]
    return run_child(argv, log, child_env(), output=out)


def run_mergekit(mk_bin: Path, wl: Workload, out: Path, log: Path, compute_dtype: str) -> ChildRun:
    """mergekit `linear`, equal weights, output in the inputs' dtype."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = mergekit.write_linear_config(
        out.with_suffix(".yml"), wl.members, compute_dtype, wl.dtype, [1.0] * wl.m
    )
    copy_tokenizer = (wl.members[0] / "tokenizer_config.json").exists()
    argv = mergekit.merge_argv(mk_bin, cfg, out, copy_tokenizer)
    return run_child(argv, log, child_env(), output=out)


def median_run(runs: Sequence[ChildRun]) -> ChildRun:
    """Median wall time and median peak RSS over repeats."""
    return ChildRun(
        wall_s=statistics.median(r.wall_s for r in runs),
        peak_rss_mb=statistics.median(r.peak_rss_mb for r in runs),
    )


def measure(
    wl: Workload, cache: str, repeats: int, mk_bin: Path, baselines: Baselines, out_root: Path
) -> Row:
    """Floor, ours and mergekit, interleaved `repeats` times in one cache state."""
    inputs, weights = input_files(wl), weight_files(wl)
    merged_size = total_bytes(safetensors_files(wl.members[0]))
    floor_out, ours_out, mk_out = out_root / "floor.bin", out_root / "ours", out_root / "mk"
    logs = LOGS / f"{wl.name}-m{wl.m}-{cache}"
    commands: dict[str, Callable[[], ChildRun]] = {
        "floor": lambda: run_floor(weights, floor_out, merged_size, logs / "floor.log"),
        "ours": lambda: run_ours(wl, ours_out, logs / "ours.log"),
        "mergekit": lambda: run_mergekit(mk_bin, wl, mk_out, logs / "mk.log", wl.dtype),
    }
    runs: dict[str, list[ChildRun]] = {k: [] for k in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            prepare_cache(cache, inputs, [floor_out, ours_out, mk_out])
            run = command()
            runs[name].append(run)
            print(
                f"  {wl.name} M={wl.m} {cache:4} {name:8} {run.wall_s:7.2f} s "
                f"{run.peak_rss_mb:7.0f} MB peak RSS",
                flush=True,
            )
    return Row(
        workload=wl,
        cache=cache,
        input_bytes=total_bytes(weights),
        output_bytes=total_bytes(safetensors_files(ours_out)),
        floor=median_run(runs["floor"]),
        ours=median_run(runs["ours"]),
        mergekit=median_run(runs["mergekit"]),
        baselines=baselines,
    )


def check_cold_drop(wl: Workload) -> str:
    """How much of the inputs stays resident after the fadvise drop (fincore)."""
    inputs = input_files(wl)
    drop_cache(inputs)
    resident = resident_bytes(inputs)
    if resident is None:
        return f"{wl.name}: fincore not available, cold-cache drop not verified"
    return (
        f"{wl.name}: {resident / MB:.1f} MB of {total_bytes(inputs) / MB:.0f} MB inputs "
        "resident after the fadvise drop"
    )


def bench_workload(wl: Workload, repeats: int, mk_bin: Path, res: Results) -> None:
    """Both cache states, then the equality check against mergekit's fp32 merge."""
    out_root = WORK / "out" / wl.name
    res.notes.append(check_cold_drop(wl))
    for cache in CACHE_STATES:
        res.rows.append(measure(wl, cache, repeats, mk_bin, res.baselines, out_root))
    ref = out_root / "mk"  # the timed run already computed in fp32 when the inputs are fp32
    if wl.dtype != "float32":
        ref = out_root / "mk-fp32"
        run_mergekit(mk_bin, wl, ref, LOGS / f"{wl.name}-mk-fp32.log", "float32")
    res.comparisons[wl.name] = compare_dirs(out_root / "ours", ref, list(wl.members))
    shutil.rmtree(out_root)


def rss_scan(wl: Workload, ms: Sequence[int], baselines: Baselines) -> list[ScanPoint]:
    """Our peak RSS on the first m members of wl, warm cache, for each m."""
    points = []
    out = WORK / "out" / "scan"
    for m in ms:
        sub = wl.subset(m)
        warm_cache(input_files(sub))
        run = run_ours(sub, out, LOGS / f"scan-{wl.name}-m{m}.log")
        extra = run.peak_rss_mb - baselines.ours.peak_rss_mb
        print(f"  scan {wl.name} M={m} {run.wall_s:7.2f} s {extra:7.0f} MB extra", flush=True)
        points.append(ScanPoint(wl.name, m, total_bytes(weight_files(sub)), run, extra))
    shutil.rmtree(out, ignore_errors=True)
    return points


def software_versions(mk_bin: Path) -> str:
    """Python, torch and mergekit versions, and the repo's commit."""
    import torch

    def out(argv: list[str]) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()

    commit = out(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    mk = out(
        [
            str(mk_bin / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('mergekit'))",
        ]
    )
    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, mergekit {mk}, "
        f"repo commit {commit or 'none yet'}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small workloads: a smoke test")
    p.add_argument("--repeats", type=int, default=None, help="runs per command (1 quick, 3 full)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Generate the workloads, measure, print and record."""
    args = parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    if not WARM_MERGE.exists():
        sys.exit(f"{WARM_MERGE} not found: build the project's .venv first (make test)")
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    started = dt.datetime.now(dt.timezone.utc)

    mk_bin = mergekit.ensure_env(BENCH_DIR / ".envs" / "mergekit")
    print("generating workloads (skipped where present) ...", flush=True)
    a = minilm_workload(WORK / "A", 3 if args.quick else 6)
    b_shape = LLAMA_QUICK if args.quick else LLAMA_FULL
    b = llama_workload(WORK / ("B-quick" if args.quick else "B"), 4, b_shape)

    res = Results(
        baselines=Baselines(
            ours=baseline_rss_mb(OUR_PYTHON, "merger.build", LOGS / "base-ours.log"),
            mergekit=baseline_rss_mb(mk_bin / "python", "mergekit.merge", LOGS / "base-mk.log"),
        )
    )
    for wl in (a, b):
        bench_workload(wl, repeats, mk_bin, res)
    res.scan = rss_scan(a, sorted({m for m in (2, 4, 6) if m < a.m} | {a.m}), res.baselines)
    b_warm = next(r for r in res.rows if r.workload is b and r.cache == "warm")
    res.scan.append(ScanPoint(b.name, b.m, b_warm.input_bytes, b_warm.ours, b_warm.ours_extra_mb))

    elapsed = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    mk_flags = " ".join(mergekit.merge_argv(mk_bin, Path("cfg.yml"), Path("OUT"), True)[3:])
    section = render(
        res,
        title=f"{started:%Y-%m-%d %H:%M} UTC{' (--quick)' if args.quick else ''}",
        context=[
            f"Command: `{' '.join(sys.orig_argv)}` (in {Path.cwd()}; took {elapsed:.0f} s)",
            f"Machine: {machine_description()}",
            f"Software: {software_versions(mk_bin)}",
            f"Repeats: {repeats} (medians); mergekit-yaml flags: `{mk_flags}` "
            "(`--no-copy-tokenizer` for inputs without tokenizer files)",
        ],
    )
    publish(RESULTS, section, append=True)


if __name__ == "__main__":
    main()
