"""The naive baseline server for serve_bench.py: one forward pass per request.

It does what OpenRLHF's `openrlhf/cli/serve_rm.py` does: an `async def` route that tokenises
the request's texts (padded to the request's longest item, truncated to the model's limit)
and runs the model inline, so requests are served one at a time in arrival order and never
batched together. Same JSON shape as warm-serve's POST /v1/score (`{"items": [{"text": ...}]}`
-> `{"results": [{"reward": ...}]}`), plus GET /ready.

Run:  .venv/bin/python benchmarks/serve_naive.py --model DIR --port P
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class NaiveScorer:
    """A sequence-classification model and its tokenizer, scored one request at a time."""

    def __init__(
        self, model_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.max_length = min(self.tokenizer.model_max_length, model.config.max_position_embeddings)

    @torch.inference_mode()
    def rewards(self, texts: list[str]) -> list[float]:
        """Raw logits of the first head, one forward pass over the request's texts."""
        batch = self.tokenizer(
            texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
        )
        logits = self.model(
            input_ids=batch["input_ids"].to(self.device),
            attention_mask=batch["attention_mask"].to(self.device),
        ).logits
        return [float(x) for x in logits[:, 0]]


def create_app(scorer: NaiveScorer) -> FastAPI:
    """The two routes the benchmark uses."""
    app = FastAPI()

    @app.post("/v1/score")
    async def score(request: Request) -> JSONResponse:
        body: dict[str, Any] = await request.json()
        # Inline on the event loop, as serve_rm does: the next request waits for this one.
        rewards = scorer.rewards([item["text"] for item in body["items"]])
        return JSONResponse({"results": [{"index": i, "reward": r} for i, r in enumerate(rewards)]})

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app


def main() -> None:
    """Load the model, warm it up once, serve until SIGTERM."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="*ForSequenceClassification dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    scorer = NaiveScorer(args.model, args.device, getattr(torch, args.dtype))
    scorer.rewards(["warm up"] * 2)
    uvicorn.run(
        create_app(scorer), host=args.host, port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
