"""Where `warm-serve` finds its embedded default model: the demo's WARM artifact.

`make demo` builds it into the demo directory (`WARM_DEMO_DIR`, default
~/.cache/warm-rm/demo); the service owns the path, and the demo writes there.
"""

from __future__ import annotations

import os
from pathlib import Path


def demo_dir() -> Path:
    """The demo's directory: data, members and artifact (`WARM_DEMO_DIR` overrides)."""
    if "WARM_DEMO_DIR" in os.environ:
        return Path(os.environ["WARM_DEMO_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "warm-rm" / "demo"


def default_model() -> Path:
    """The demo's WARM artifact: the model `warm-serve` serves when given none."""
    return demo_dir() / "warm"
