"""Model backends: turn batches of token ids into reward-head outputs."""

from service.backends.base import Backend, ModelInfo

__all__ = ["Backend", "ModelInfo"]
