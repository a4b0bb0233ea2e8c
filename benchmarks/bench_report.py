"""The figures merge_bench.py collects, and their markdown rendering for RESULTS.md."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench_compare import Comparison
from bench_measure import ChildRun
from bench_workloads import Workload

GB = 1e9

# Targets for the merger, printed next to the figures.
MAX_FLOOR_RATIO = 1.25
MAX_EXTRA_RSS_MB = 256.0
MAX_RSS_SPREAD_MB = 64.0  # "flat": peak extra RSS varies by at most this across M and size
MIN_SPEEDUP = 2.0
MAX_RSS_RATIO = 1 / 3
MAX_ULP = 1

RESULTS_HEADER = """# Benchmark results

## Current figures

## History (dated runs, oldest first)
"""
COLUMNS = (
    "workload",
    "M",
    "input GB",
    "output GB",
    "cache",
    "I/O floor s",
    "warm-merge s",
    "ratio to floor",
    "ratio to floor excl. start-up",
    "warm-merge peak extra RSS MB",
    "mergekit s",
    "mergekit peak extra RSS MB",
    "speedup vs mergekit",
    "RSS ratio",
    "max ulp diff vs mergekit fp32",
)


@dataclass(frozen=True)
class Baselines:
    """Children that only import each tool: their peak RSS and start-up time."""

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

    @property
    def ours_work_s(self) -> float:
        """Our wall time less the import-only start-up (torch alone takes seconds)."""
        return self.ours.wall_s - self.baselines.ours.wall_s

    @property
    def ours_extra_mb(self) -> float:
        """Our peak RSS above the import-only baseline."""
        return self.ours.peak_rss_mb - self.baselines.ours.peak_rss_mb

    @property
    def mergekit_extra_mb(self) -> float:
        """mergekit's peak RSS above its import-only baseline."""
        return self.mergekit.peak_rss_mb - self.baselines.mergekit.peak_rss_mb


@dataclass(frozen=True)
class ScanPoint:
    """Our peak extra RSS for one workload at one M."""

    workload: str
    m: int
    input_bytes: int
    run: ChildRun
    extra_mb: float


@dataclass
class Results:
    """Everything one benchmark run measured."""

    baselines: Baselines
    rows: list[Row] = field(default_factory=list)
    comparisons: dict[str, Comparison] = field(default_factory=dict)  # by workload name
    scan: list[ScanPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def machine_description() -> str:
    """Cores, RAM and CPU model of this machine."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")),
        platform.processor() or "unknown CPU",
    )
    flags = next((ln for ln in cpuinfo if ln.startswith("flags")), "").split()
    isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16") if f in flags)
    meminfo = Path("/proc/meminfo").read_text().split()
    ram_gib = int(meminfo[meminfo.index("MemTotal:") + 1]) / (1 << 20)
    return f"{os.cpu_count()} cores, {ram_gib:.1f} GiB RAM, {model} ({isa}), {platform.platform()}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _main_row(r: Row, ulp: int | None) -> list[str]:
    return [
        r.workload.name,
        str(r.workload.m),
        f"{r.input_bytes / GB:.2f}",
        f"{r.output_bytes / GB:.3f}",
        r.cache,
        f"{r.floor.wall_s:.2f}",
        f"{r.ours.wall_s:.2f}",
        f"{r.ours.wall_s / r.floor.wall_s:.2f}",
        f"{r.ours_work_s / r.floor.wall_s:.2f}",
        f"{r.ours_extra_mb:.0f}",
        f"{r.mergekit.wall_s:.2f}",
        f"{r.mergekit_extra_mb:.0f}",
        f"{r.mergekit.wall_s / r.ours.wall_s:.2f}",
        f"{r.ours_extra_mb / r.mergekit_extra_mb:.2f}",
        "-" if ulp is None else str(ulp),
    ]


def main_table(res: Results) -> str:
    """The headline table, one row per workload and cache state."""
    rows = []
    for r in res.rows:
        c = res.comparisons.get(r.workload.name)
        rows.append(_main_row(r, None if c is None else c.max_ulp))
    return markdown_table(COLUMNS, rows)


def scan_table(res: Results) -> str:
    """Our peak extra RSS against M and model size."""
    header = ["workload", "M", "input GB", "warm-merge s", "warm-merge peak extra RSS MB"]
    rows = [
        [
            p.workload,
            str(p.m),
            f"{p.input_bytes / GB:.2f}",
            f"{p.run.wall_s:.2f}",
            f"{p.extra_mb:.0f}",
        ]
        for p in res.scan
    ]
    return markdown_table(header, rows)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def targets(res: Results) -> list[str]:
    """Each target with the measured figure and PASS/FAIL."""
    rows, comps = res.rows, list(res.comparisons.values())
    ratio = max(r.ours.wall_s / r.floor.wall_s for r in rows)
    work_ratio = max(r.ours_work_s / r.floor.wall_s for r in rows)
    extras = [r.ours_extra_mb for r in rows] + [p.extra_mb for p in res.scan]
    scan_extras = [p.extra_mb for p in res.scan] or [0.0]
    spread = max(scan_extras) - min(scan_extras)
    speedup = min(r.mergekit.wall_s / r.ours.wall_s for r in rows)
    rss_ratio = max(r.ours_extra_mb / r.mergekit_extra_mb for r in rows)
    ulp = max(c.max_ulp for c in comps)
    exact_ulp = max(c.ours_vs_exact_ulp for c in comps)
    return [
        f"wall <= {MAX_FLOOR_RATIO} x I/O floor: worst {ratio:.2f} x -> "
        f"{_verdict(ratio <= MAX_FLOOR_RATIO)} (excluding start-up: worst {work_ratio:.2f} x)",
        f"peak extra RSS <= {MAX_EXTRA_RSS_MB:.0f} MB: worst {max(extras):.0f} MB -> "
        f"{_verdict(max(extras) <= MAX_EXTRA_RSS_MB)}",
        f"peak extra RSS flat in M and size (spread <= {MAX_RSS_SPREAD_MB:.0f} MB): "
        f"spread {spread:.0f} MB -> {_verdict(spread <= MAX_RSS_SPREAD_MB)}",
        f">= {MIN_SPEEDUP:.0f}x faster than mergekit: slowest {speedup:.2f}x -> "
        f"{_verdict(speedup >= MIN_SPEEDUP)}",
        f"<= 1/3 of mergekit's peak extra RSS: worst {rss_ratio:.2f} -> "
        f"{_verdict(rss_ratio <= MAX_RSS_RATIO)}",
        f"within {MAX_ULP} ulp of mergekit's fp32 linear merge: worst {ulp} ulp -> "
        f"{_verdict(ulp <= MAX_ULP)} (ours vs the fp64 average: worst {exact_ulp} ulp)",
    ]


def comparison_note(name: str, c: Comparison) -> str:
    """What the equality check found for one workload, in one line."""
    parts = [
        f"{name}: {c.elements:,} elements; max {c.max_ulp} ulp vs mergekit fp32 "
        f"(worst tensor {c.worst_tensor or '-'}), {c.elements_over_1ulp:,} elements > 1 ulp; "
        f"vs the fp64 average rounded once to the output dtype: ours {c.ours_vs_exact_ulp} ulp, "
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


def render(res: Results, title: str, context: Sequence[str]) -> str:
    """One dated RESULTS.md section: context lines, tables, targets, notes."""
    b = res.baselines
    context = [
        *context,
        f"Import-only baselines (peak RSS / wall): warm-merge {b.ours.peak_rss_mb:.0f} MB / "
        f"{b.ours.wall_s:.2f} s, mergekit {b.mergekit.peak_rss_mb:.0f} MB / "
        f"{b.mergekit.wall_s:.2f} s (the wall times below include this start-up)",
    ]
    notes = [*res.notes, *(comparison_note(k, c) for k, c in res.comparisons.items())]
    return "\n\n".join(
        [
            f"## {title}",
            "\n".join(f"- {line}" for line in context),
            main_table(res),
            "Peak extra RSS of warm-merge against M and model size (warm cache):",
            scan_table(res),
            "Targets:\n" + "\n".join(f"- {t}" for t in targets(res)),
            "Notes:\n" + "\n".join(f"- {n}" for n in notes),
        ]
    )


def append_results(path: Path, section: str) -> None:
    """Append one dated section to RESULTS.md's history (its headings one level down, under
    "History"), creating the file with its headings if missing. The current-figures table
    at the top is edited by hand."""
    if not path.exists():
        path.write_text(RESULTS_HEADER)
    lines = section.split("\n")
    demoted = "\n".join("#" + line if line.startswith("#") else line for line in lines)
    with path.open("a") as f:
        f.write("\n" + demoted + "\n")


def publish(path: Path, section: str, append: bool) -> None:
    """Print a benchmark's section and, with `append`, add it to RESULTS.md."""
    print("\n" + section)
    if append:
        append_results(path, section)
        print(f"\nappended to {path}")
