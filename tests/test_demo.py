"""`make demo` end to end: members, merge, verify, score, then the service over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_demo_merges_serves_and_ranks(tmp_path: Path) -> None:
    env = {**os.environ, "WARM_DEMO_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "merger.demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "ok: " in out and "files match the manifest" in out
    assert "POST /v1/score" in out and "POST /v1/rerank" in out
    gap = float(out.split("max |HTTP reward - transformers forward| = ")[1].split()[0])
    assert gap < 1e-5
    assert "server stopped" in out
    assert (tmp_path / "warm" / "warm_manifest.json").is_file()
