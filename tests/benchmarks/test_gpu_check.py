"""The GPU check script, run as CI runs it: `--dry-run` on the CPU, every phase through,
and the two phases the dry run leaves out, in-process on the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def test_the_gpu_check_runs_every_phase_on_a_cpu(tmp_path: Path) -> None:
    argv = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = (tmp_path / "report.md").read_text()
    for phase, _, _ in gpu_check.PHASES:
        assert f"**{phase}**:" in report, phase
    left_out = {f"**{name}**: {why}" for name, why in gpu_check.DRY_RUN_LEAVES_OUT.items()}
    assert all(line in report for line in left_out)
    assert "failed" not in report and "skipped" not in report and "FAILED" not in report
    assert "| 4 | 8 |" in report  # the throughput table, both servers measured
    # The out-of-memory phase split batches and lost nothing.
    oom = next(line for line in report.splitlines() if line.startswith("**oom**"))
    assert " 0 forwards out of memory" not in oom and " 0 requests lost" in oom


@pytest.mark.vllm
@pytest.mark.usefixtures("needs_vllm")
def test_the_phases_the_dry_run_leaves_out_run_on_a_cpu(tmp_path: Path) -> None:
    check = gpu_check.Check(dry_run=True, budget_s=600, out=tmp_path, append=False)
    gpu_check.build_model(check)
    compiled = gpu_check.compiled(check)
    assert "compiled in " in compiled and "max |compiled - eager|" in compiled
    vllm = gpu_check.vllm_agreement(check)
    assert "head float32" in vllm and "trunk bfloat16" in vllm, vllm
