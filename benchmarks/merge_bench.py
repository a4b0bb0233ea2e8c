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
     a child that only runs `import merger.cli`;
  3. mergekit 0.1.5 `linear` merge (own virtualenv in benchmarks/.envs/mergekit), with
     dtype = out_dtype = the inputs' dtype: wall time, peak RSS above `import mergekit.merge`.
Wall time runs until the output is durable (child wall + fsync of what it wrote; the
floor fsyncs itself). Peak RSS is ru_maxrss from os.wait4. With --repeats N the three
commands run interleaved N times and the medians are reported.
Then 4. equality: our output against mergekit's `dtype: float32` linear merge, tensor by
tensor, in ulps of the output dtype (and both against the exact fp64 average), listing any
tensor mergekit skipped or shaped differently; and 5. our peak extra RSS on A at M = 2, 4, 6
and on B, to show whether memory stays flat in M and in model size.

The tables are printed and appended, with the date, command and machine, to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import bench_mergekit as mergekit
from bench_compare import Comparison, compare_dirs
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
from bench_workloads import LLAMA_FULL, LLAMA_QUICK, Workload, llama_workload, minilm_workload

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORK = BENCH_DIR / ".work"
RESULTS = BENCH_DIR / "RESULTS.md"
OUR_PYTHON = REPO / ".venv" / "bin" / "python"
WARM_MERGE = REPO / ".venv" / "bin" / "warm-merge"
GB = 1e9
MB = 1 << 20

# Targets for the merger, printed next to the figures.
MAX_FLOOR_RATIO = 1.25
MAX_EXTRA_RSS_MB = 256.0
MAX_RSS_SPREAD_MB = 64.0  # "flat": peak extra RSS varies by at most this across M and size
MIN_SPEEDUP = 2.0
MAX_RSS_RATIO = 1 / 3
MAX_ULP = 1

RESULTS_HEADER = """# Merge benchmark results

Appended by `benchmarks/merge_bench.py` (its docstring says what is measured and how).
Compare ratios within one section; absolute times vary between runs on a shared machine.
"""


@dataclass(frozen=True)
class Baselines:
    """Peak RSS and wall time of children that only import each tool."""

    ours: ChildRun
    mergekit: ChildRun


@dataclass(frozen=True)
class Row:
    """One workload in one cache state: medians over the repeats."""

    workload: Workload
    cache: str
    input_bytes: int
    output_bytes: int
    floor: ChildRun
    ours: ChildRun
    mergekit: ChildRun
    baselines: Baselines
    max_ulp: int | None = None

    @property
    def ours_extra_mb(self) -> float:
        """Our peak RSS above the import-only baseline."""
        return self.ours.peak_rss_mb - self.baselines.ours.peak_rss_mb

    @property
    def mergekit_extra_mb(self) -> float:
        """mergekit's peak RSS above its import-only baseline."""
        return self.mergekit.peak_rss_mb - self.baselines.mergekit.peak_rss_mb


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
    return run_child(mergekit.merge_argv(mk_bin, cfg, out), log, child_env(), output=out)


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
    inputs = input_files(wl)
    weights = weight_files(wl)
    merged_size = total_bytes(safetensors_files(wl.members[0]))
    floor_out, ours_out, mk_out = out_root / "floor.bin", out_root / "ours", out_root / "mk"
    outputs = [floor_out, ours_out, mk_out]
    logs = WORK / "logs" / f"{wl.name}-m{wl.m}-{cache}"
    commands: dict[str, Callable[[], ChildRun]] = {
        "floor": lambda: run_floor(weights, floor_out, merged_size, logs / "floor.log"),
        "ours": lambda: run_ours(wl, ours_out, logs / "ours.log"),
        "mergekit": lambda: run_mergekit(mk_bin, wl, mk_out, logs / "mk.log", wl.dtype),
    }
    runs: dict[str, list[ChildRun]] = {k: [] for k in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            prepare_cache(cache, inputs, outputs)
            runs[name].append(command())
            print(f"  {wl.name} M={wl.m} {cache:4} {name:8} {runs[name][-1]}", flush=True)
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


def equality(wl: Workload, mk_bin: Path, out_root: Path) -> Comparison:
    """Our output vs mergekit's fp32 linear merge (reusing the timed run when inputs are fp32)."""
    ref = out_root / "mk"
    if wl.dtype != "float32":
        ref = out_root / "mk-fp32"
        run_mergekit(mk_bin, wl, ref, WORK / "logs" / f"{wl.name}-mk-fp32.log", "float32")
    return compare_dirs(out_root / "ours", ref, list(wl.members))


def rss_scan(wl: Workload, ms: Sequence[int], baselines: Baselines) -> list[tuple[int, ChildRun]]:
    """Our peak RSS on the first m members of wl, warm cache, for each m."""
    out = []
    for m in ms:
        sub = wl.subset(m)
        warm_cache(input_files(sub))
        run = run_ours(sub, WORK / "out" / "scan", WORK / "logs" / f"scan-{wl.name}-m{m}.log")
        print(f"  scan {wl.name} M={m} {run}", flush=True)
        out.append((m, run))
    shutil.rmtree(WORK / "out" / "scan", ignore_errors=True)
    return out


# ---------------------------------------------------------------------------- report


def machine_description() -> str:
    """Cores, RAM and CPU model of this machine, plus software versions."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
        platform.processor() or "unknown CPU",
    )
    flags = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16") if f" {f}" in flags)
    meminfo = Path("/proc/meminfo").read_text().split()
    ram_gib = int(meminfo[meminfo.index("MemTotal:") + 1]) / (1 << 20)
    return f"{os.cpu_count()} cores, {ram_gib:.1f} GiB RAM, {model} ({isa}), {platform.platform()}"


def software_versions(mk_bin: Path) -> str:
    """Python, torch and tool versions, and the repo's commit."""
    import torch

    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    mk = subprocess.run(
        [
            str(mk_bin / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('mergekit'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, mergekit {mk}, "
        f"repo commit {commit or 'none yet'}"
    )


COLUMNS = (
    "workload",
    "M",
    "input GB",
    "output GB",
    "cache",
    "I/O floor s",
    "warm-merge s",
    "ratio to floor",
    "warm-merge peak extra RSS MB",
    "mergekit s",
    "mergekit peak extra RSS MB",
    "speedup vs mergekit",
    "RSS ratio",
    "max ulp diff vs mergekit fp32",
)


def table_row(r: Row) -> list[str]:
    """One markdown table row."""
    return [
        r.workload.name,
        str(r.workload.m),
        f"{r.input_bytes / GB:.2f}",
        f"{r.output_bytes / GB:.3f}",
        r.cache,
        f"{r.floor.wall_s:.2f}",
        f"{r.ours.wall_s:.2f}",
        f"{r.ours.wall_s / r.floor.wall_s:.2f}",
        f"{r.ours_extra_mb:.0f}",
        f"{r.mergekit.wall_s:.2f}",
        f"{r.mergekit_extra_mb:.0f}",
        f"{r.mergekit.wall_s / r.ours.wall_s:.2f}",
        f"{r.ours_extra_mb / r.mergekit_extra_mb:.2f}",
        "-" if r.max_ulp is None else str(r.max_ulp),
    ]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def rss_table(scan: Sequence[tuple[Workload, int, ChildRun]], baseline_mb: float) -> str:
    """Our peak extra RSS against M and model size."""
    rows = [
        [
            wl.name,
            str(m),
            f"{total_bytes(weight_files(wl.subset(m))) / GB:.2f}",
            f"{run.wall_s:.2f}",
            f"{run.peak_rss_mb - baseline_mb:.0f}",
        ]
        for wl, m, run in scan
    ]
    header = ["workload", "M", "input GB", "warm-merge s", "warm-merge peak extra RSS MB"]
    return markdown_table(header, rows)


def verdict(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"


def targets(rows: Sequence[Row], scan_extra_mb: Sequence[float]) -> list[str]:
    """Each target with the measured figure and PASS/FAIL."""
    worst_ratio = max(r.ours.wall_s / r.floor.wall_s for r in rows)
    worst_extra = max([r.ours_extra_mb for r in rows] + list(scan_extra_mb))
    spread = max(scan_extra_mb) - min(scan_extra_mb)
    min_speedup = min(r.mergekit.wall_s / r.ours.wall_s for r in rows)
    worst_rss_ratio = max(r.ours_extra_mb / r.mergekit_extra_mb for r in rows)
    ulps = [r.max_ulp for r in rows if r.max_ulp is not None]
    return [
        f"wall <= {MAX_FLOOR_RATIO} x I/O floor: worst {worst_ratio:.2f} x "
        f"-> {verdict(worst_ratio <= MAX_FLOOR_RATIO)}",
        f"peak extra RSS <= {MAX_EXTRA_RSS_MB:.0f} MB: worst {worst_extra:.0f} MB "
        f"-> {verdict(worst_extra <= MAX_EXTRA_RSS_MB)}",
        f"peak extra RSS flat in M and size (spread <= {MAX_RSS_SPREAD_MB:.0f} MB): "
        f"spread {spread:.0f} MB -> {verdict(spread <= MAX_RSS_SPREAD_MB)}",
        f">= {MIN_SPEEDUP:.0f}x faster than mergekit: slowest {min_speedup:.2f}x "
        f"-> {verdict(min_speedup >= MIN_SPEEDUP)}",
        f"<= 1/3 of mergekit's peak extra RSS: worst {worst_rss_ratio:.2f} "
        f"-> {verdict(worst_rss_ratio <= MAX_RSS_RATIO)}",
        f"within {MAX_ULP} ulp of mergekit's fp32 linear merge: worst {max(ulps)} ulp "
        f"-> {verdict(max(ulps) <= MAX_ULP)}",
    ]


def comparison_notes(wl: Workload, c: Comparison) -> str:
    """What the equality check found, in one paragraph."""
    parts = [
        f"{wl.name}: {c.elements:,} elements; max {c.max_ulp} ulp vs mergekit fp32 "
        f"(worst tensor {c.worst_tensor or '-'}), {c.elements_over_1ulp:,} elements > 1 ulp; "
        f"vs the exact fp64 average rounded once: ours {c.ours_vs_exact_ulp} ulp, "
        f"mergekit {c.reference_vs_exact_ulp} ulp"
    ]
    for label, names in (
        ("skipped by mergekit", c.missing_in_reference),
        ("only in mergekit's output", c.extra_in_reference),
        ("shape differs", c.shape_mismatch),
        ("dtype differs", c.dtype_mismatch),
        ("integer tensor differs", c.integer_mismatch),
    ):
        parts.append(f"{label}: {', '.join(names) if names else 'none'}")
    return "; ".join(parts)


def append_results(text: str) -> None:
    """Append one dated section to RESULTS.md, creating it with a header if missing."""
    if not RESULTS.exists():
        RESULTS.write_text(RESULTS_HEADER)
    with RESULTS.open("a") as f:
        f.write("\n" + text)


# ------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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

    baselines = Baselines(
        ours=baseline_rss_mb(OUR_PYTHON, "merger.cli", WORK / "logs" / "base-ours.log"),
        mergekit=baseline_rss_mb(
            mk_bin / "python", "mergekit.merge", WORK / "logs" / "base-mk.log"
        ),
    )
    rows: list[Row] = []
    notes: list[str] = []
    for wl in (a, b):
        out_root = WORK / "out" / wl.name
        notes.append(check_cold_drop(wl))
        wl_rows = [
            measure(wl, cache, repeats, mk_bin, baselines, out_root) for cache in ("warm", "cold")
        ]
        comparison = equality(wl, mk_bin, out_root)
        notes.append(comparison_notes(wl, comparison))
        rows += [dataclasses.replace(r, max_ulp=comparison.max_ulp) for r in wl_rows]
        shutil.rmtree(out_root)

    a_ms = sorted({m for m in (2, 4, 6) if m < a.m} | {a.m})
    scan = [(a, m, run) for m, run in rss_scan(a, a_ms, baselines)]
    scan += [(b, b.m, r.ours) for r in rows if r.workload is b and r.cache == "warm"]
    scan_extra = [run.peak_rss_mb - baselines.ours.peak_rss_mb for _, _, run in scan]

    elapsed = dt.datetime.now(dt.timezone.utc) - started
    command = " ".join(sys.orig_argv)
    report = "\n\n".join(
        [
            f"## {started:%Y-%m-%d %H:%M} UTC{' (--quick)' if args.quick else ''}",
            f"- Command: `{command}` (from {Path.cwd()}; took {elapsed.total_seconds():.0f} s)\n"
            f"- Machine: {machine_description()}\n"
            f"- Software: {software_versions(mk_bin)}\n"
            f"- Repeats: {repeats} (medians); mergekit flags: "
            f"`{' '.join(mergekit.merge_argv(Path('.'), Path('cfg.yml'), Path('OUT'))[1:])}`\n"
            f"- Import-only baselines (peak RSS / wall): warm-merge "
            f"{baselines.ours.peak_rss_mb:.0f} MB / {baselines.ours.wall_s:.2f} s, mergekit "
            f"{baselines.mergekit.peak_rss_mb:.0f} MB / {baselines.mergekit.wall_s:.2f} s "
            "(the wall times below include this start-up)",
            markdown_table(COLUMNS, [table_row(r) for r in rows]),
            "Peak extra RSS of warm-merge against M and model size (warm cache):",
            rss_table(scan, baselines.ours.peak_rss_mb),
            "Targets:\n" + "\n".join(f"- {t}" for t in targets(rows, scan_extra)),
            "Notes:\n" + "\n".join(f"- {n}" for n in notes),
        ]
    )
    print("\n" + report)
    append_results(report + "\n")
    print(f"\nappended to {RESULTS}")


if __name__ == "__main__":
    main()
