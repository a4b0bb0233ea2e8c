"""mergekit 0.1.5, the reference merger, in its own virtualenv under benchmarks/.envs/.

mergekit's resolver would pull a newer (CUDA) torch, so the local CPU wheel is installed
first and then pinned through a constraints file while mergekit installs.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

MERGEKIT_VERSION = "0.1.5"
TORCH_PIN = "torch==2.13.0"


def ensure_env(env_dir: Path) -> Path:
    """Create the mergekit virtualenv if missing; return its bin/ directory."""
    bin_dir = env_dir / "bin"
    if (bin_dir / "mergekit-yaml").exists():
        return bin_dir
    print(f"creating {env_dir} (mergekit=={MERGEKIT_VERSION}) ...", flush=True)
    subprocess.run(["python3", "-m", "venv", str(env_dir)], check=True)
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    constraints = env_dir / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    subprocess.run(
        [*pip, f"mergekit=={MERGEKIT_VERSION}", "--constraint", str(constraints)], check=True
    )
    return bin_dir


def write_linear_config(
    path: Path, members: Sequence[Path], dtype: str, out_dtype: str, weights: Sequence[float]
) -> Path:
    """A `linear` merge config; JSON is valid YAML, so no YAML library is needed here."""
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(m.resolve()), "parameters": {"weight": w}}
            for m, w in zip(members, weights, strict=True)
        ],
        "dtype": dtype,
        "out_dtype": out_dtype,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def merge_argv(bin_dir: Path, config: Path, out: Path, copy_tokenizer: bool) -> list[str]:
    """The mergekit-yaml command line: CPU only, as lean in memory as 0.1.5 offers."""
    return [
        str(bin_dir / "mergekit-yaml"),
        str(config),
        str(out),
        "--allow-crimes",
        "--lazy-unpickle",  # only affects pickled .bin inputs; harmless on safetensors
        "--no-cuda",
        "--quiet",
        # Without tokenizer files mergekit still tries (and logs a traceback): skip it there.
        "--copy-tokenizer" if copy_tokenizer else "--no-copy-tokenizer",
    ]
