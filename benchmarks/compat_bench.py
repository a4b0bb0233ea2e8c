"""Compatibility costs nothing: 64 concurrent one-sample clients on /classify (verl's reward
loop) and on /get_reward (OpenRLHF) against the same load on /v1/score, on one server.

Run:  make bench-compat   (or .venv/bin/python benchmarks/compat_bench.py [--append])

Each client posts one sample per request, its body built as its client builds it (aiohttp's
`json.dumps` defaults): `{"items": [{"text": t}]}`, `{"model", "input", "use_activation":
false}` and `{"query": [t], "prompts": [""], "labels": [""]}`. The endpoints take turns for
ROUNDS rounds against one running server, in an order that rotates every round, so drift
and position move all three alike; the figure is the median over rounds of the ratio of
items/s to /v1/score's in the same round, for the packaged MiniLM reward model (the
forward dominates) and for a tiny 2-layer GPT-2 (the HTTP front dominates).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import serve_bench as sb
from bench_report import machine_description, markdown_table, publish
from tokenizers import Tokenizer

CONCURRENCY = 64
ROUNDS = 6  # each endpoint goes first, second and third twice
WARMUP_S, WINDOW_S = 2.0, 10.0
TARGET = 0.9  # items/s of /classify and /get_reward over /v1/score's
TINY_DIR = sb.WORK / "tiny-gpt2-rm"


def ensure_tiny(out: Path) -> Path:
    """A tiny GPT-2 reward model (2 layers, hidden 64) with MiniLM's tokenizer, saved once."""
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(sb.MODEL_DIR)
    torch.manual_seed(sb.HEAD_SEED)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=512, n_embd=64, n_layer=2, n_head=2,
        num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    tmp = out.with_name(out.name + ".tmp")
    GPT2ForSequenceClassification(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def endpoint_bodies(texts: Sequence[str], tokens: Sequence[int]) -> dict[str, sb.Bodies]:
    """One-sample bodies per endpoint, as each client serialises them."""
    shapes = {
        "/v1/score": lambda t: {"items": [{"text": t}]},
        "/classify": lambda t: {"model": "warm-rm", "input": t, "use_activation": False},
        "/get_reward": lambda t: {"query": [t], "prompts": [""], "labels": [""]},
    }
    return {
        path: sb.Bodies(
            [json.dumps(shape(t)).encode() for t in texts], [1] * len(texts), list(tokens), path
        )
        for path, shape in shapes.items()
    }


def measure(model: Path, name: str) -> list[list[str]]:
    """Rows of (model, endpoint, items/s per round, median ratio to /v1/score)."""
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    wl = sb.workloads(tok)["fixed"]
    bodies = endpoint_bodies(wl.texts, wl.tokens)
    port = sb.free_port()
    argv = sb.warm_serve_argv(model, [*sb.OURS_ARGS, "--model-id", "warm-rm"])(port)
    rates: dict[str, list[float]] = {path: [] for path in bodies}
    with sb.server(f"compat-{name}", argv, port) as url:
        paths = list(bodies)
        for round_ in range(ROUNDS):
            shift = round_ % len(paths)  # rotate: no endpoint always runs after the others
            for path in paths[shift:] + paths[:shift]:
                b = bodies[path]
                window = sb.run_async(sb.closed_loop(url, b, CONCURRENCY, WARMUP_S, WINDOW_S))
                result = sb.summarise(
                    window, server=path, workload="fixed", mode="closed",
                    concurrency=CONCURRENCY, per_request=1,
                )  # fmt: skip
                if result.errors:
                    raise RuntimeError(f"{path}: {result.errors} failed requests")
                rates[path].append(result.items_per_s)
                sb.say(f"{name} round {round_} {path}: {result.items_per_s:.1f} items/s")
    reference = rates["/v1/score"]
    rows = []
    for path, values in rates.items():
        ratio = statistics.median(v / r for v, r in zip(values, reference, strict=True))
        verdict = "" if path == "/v1/score" else ("met" if ratio >= TARGET else "not met")
        per_round = " / ".join(f"{v:.1f}" for v in values)
        rows.append([name, path, per_round, f"{ratio:.3f}", verdict])
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--append", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args(argv)
    minilm = sb.ensure_model(sb.MODEL_DIR)
    rows = measure(minilm, "MiniLM") + measure(ensure_tiny(TINY_DIR), "tiny GPT-2")
    table = markdown_table(
        ["model", "endpoint", "items/s per round", "ratio to /v1/score (median)", "target 0.9"],
        rows,
    )
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = "\n".join(
        [
            f"## Compatible endpoints under load ({when})",
            "",
            f"`benchmarks/compat_bench.py`: {CONCURRENCY} concurrent clients, one sample per "
            f"request, 128-token texts, {ROUNDS} rounds of {WINDOW_S:.0f} s per endpoint "
            "(the order rotating every round) against one warm-serve (transformers backend, "
            f"default settings but --max-batch-size {sb.MAX_BATCH}). "
            f"Machine: {machine_description()}.",
            "",
            table,
        ]
    )
    publish(sb.RESULTS, section, args.append)


if __name__ == "__main__":
    main()
