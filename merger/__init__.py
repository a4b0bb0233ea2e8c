"""Offline side of warm-rm: merge M reward-model checkpoints into one WARM artifact."""

__version__ = "0.1.0"
