"""The reward service (FastAPI): batched scoring and best-of-N reranking."""
