"""Interleaved A/B of `warm-serve --compile`: one forward at a time (`--model-workers 1`)
against forwards side by side (the default), on the serve_bench model and fixed workload;
or, with `--against DIR`, this checkout's code against another checkout's (e.g. a
`git worktree` of an earlier commit), both with the batch budget and overhead pinned
(`PINNED`): the warm-up's timings vary from start to start, and a budget picked by that
noise would be compared instead of the code.

Run:  .venv/bin/python benchmarks/serve_ab.py [--against DIR] [--rounds N] [--point C,K ...]

Both servers are up at once (each idle while the other is measured); every point runs
against one, then the other, for two rounds, so drift moves both and not their ratio.
Printed only: the figures go into the reading of a serve_bench section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import serve_bench as sb
from tokenizers import Tokenizer

SERVERS = {"one at a time": ["--model-workers", "1"], "side by side": []}
PINNED = ["--no-tune-batch-tokens", "--max-batch-tokens", "1024", "--batch-overhead-tokens", "64"]
POINTS = [(32, 1), (128, 1), (32, 8)]  # (concurrency, items per request)
ROUNDS = 2
WARMUP_S, WINDOW_S = 2.0, 15.0


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--against", type=Path, help="another checkout's root: code A/B")
    parser.add_argument("--other-first", action="store_true", help="start --against's first")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--point", action="append", default=[], help="C,K (repeatable; default: POINTS)"
    )
    args = parser.parse_args()
    points = [tuple(int(x) for x in p.split(",")) for p in args.point] or POINTS
    sb.ensure_model(sb.MODEL_DIR)
    servers: dict[str, tuple[list[str], dict[str, str]]] = {
        name: (extra, {}) for name, extra in SERVERS.items()
    }
    if args.against is not None:
        other = str(args.against.resolve())
        servers = {"this checkout": (PINNED, {}), other: (PINNED, {"PYTHONPATH": other})}
        if args.other_first:
            servers = dict(reversed(servers.items()))
    tok = Tokenizer.from_file(str(sb.MODEL_DIR / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    fixed = sb.workloads(tok)["fixed"]
    bodies = {k: sb.make_bodies(fixed, k) for _, k in points}
    with contextlib.ExitStack() as stack:
        urls = {}
        for i, (name, (extra, env)) in enumerate(servers.items()):
            port = sb.free_port()
            argv = sb.warm_serve_argv(sb.MODEL_DIR, [*sb.OURS_ARGS, "--compile", *extra])(port)
            ready = sb.COMPILED_READY_TIMEOUT_S
            urls[name] = stack.enter_context(
                sb.server(f"ab-{i}", argv, port, env=env, ready_timeout_s=ready)
            )
        for round_ in range(args.rounds):
            for c, k in points:
                # Alternate which server goes first, so drift within a round cancels out.
                order = list(urls.items()) if round_ % 2 == 0 else list(reversed(urls.items()))
                for name, url in order:
                    w = sb.run_async(sb.closed_loop(url, bodies[k], c, WARMUP_S, WINDOW_S))
                    r = sb.summarise(
                        w, server=name, workload="fixed", mode="closed", concurrency=c,
                        per_request=k,
                    )  # fmt: skip
                    sb.say(
                        f"round {round_} C={c} x{k} {name}: {r.items_per_s:.1f} items/s, "
                        f"p50 {r.p50_s * 1e3:.0f} ms, batch {sb.fmt(r.stats.batch_size)}, "
                        f"forward {sb.fmt(r.stats.forward_s, '.0f', 1e3)} ms, "
                        f"busy {sb.fmt(r.stats.busy, '.2f')}, client CPU {r.client_cpu:.2f}"
                    )


if __name__ == "__main__":
    main()
