"""The GPU check script, run as CI runs it: `--dry-run` on the CPU, every phase through."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_the_gpu_check_runs_every_phase_on_a_cpu(tmp_path: Path) -> None:
    argv = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = (tmp_path / "report.md").read_text()
    for phase in ("environment", "model", "tests", "agreement", "overhead", "throughput"):
        assert f"**{phase}**:" in report, phase
    assert "failed" not in report and "skipped" not in report and "FAILED" not in report
    assert "| 4 | 8 |" in report  # the throughput table, both servers measured
