"""`make demo` end to end: fine-tune, merge, verify, evaluate, then the service over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_demo(demo_dir: Path) -> str:
    env = {**os.environ, "WARM_DEMO_DIR": str(demo_dir), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "merger.recipe.demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.timeout(1800)  # two demo runs; the first fine-tunes 4 MiniLM RMs on the CPU
def test_demo_finetunes_merges_serves_and_ranks_then_reuses_its_cache(tmp_path: Path) -> None:
    out = run_demo(tmp_path)
    assert out.count("from step 0") == 4  # four members trained
    assert "ok: " in out and "files match the manifest" in out
    assert "POST /v1/score" in out and "POST /v1/rerank" in out
    gap = float(out.split("max |HTTP reward - transformers forward| = ")[1].split()[0])
    assert gap < 1e-5
    assert "model warm-demo" in out  # served with no --model: the embedded default
    assert "self-check passed: " in out  # calibrated by finetune: a golden set
    assert "Bradley-Terry temperature" in out
    assert "the better answer ranked first: 3/3" in out
    assert "server stopped" in out
    assert (tmp_path / "warm" / "warm_manifest.json").is_file()

    again = run_demo(tmp_path)
    assert "from step 0" not in again  # nothing retrained
    assert again.count("held-out accuracy") == out.count("held-out accuracy")
    assert "the better answer ranked first: 3/3" in again
