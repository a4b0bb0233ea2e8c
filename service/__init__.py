"""The reward service (FastAPI): batched scoring and best-of-N reranking."""

from merger import __version__

__all__ = ["__version__"]
