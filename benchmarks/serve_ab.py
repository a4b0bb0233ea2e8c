"""Interleaved A/B of `warm-serve --compile`: one forward at a time (`--model-workers 1`)
against forwards side by side (the default), on the serve_bench model and fixed workload;
or, with `--against DIR`, this checkout's code against another checkout's (e.g. a
`git worktree` of an earlier commit), both with default settings.

Run:  .venv/bin/python benchmarks/serve_ab.py [--against DIR]

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
POINTS = [(32, 1), (128, 1), (32, 8)]  # (concurrency, items per request)
ROUNDS = 2
WARMUP_S, WINDOW_S = 2.0, 15.0


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--against", type=Path, help="another checkout's root: code A/B")
    args = parser.parse_args()
    sb.ensure_model(sb.MODEL_DIR)
    servers: dict[str, tuple[list[str], dict[str, str]]] = {
        name: (extra, {}) for name, extra in SERVERS.items()
    }
    if args.against is not None:
        other = str(args.against.resolve())
        servers = {"this checkout": ([], {}), other: ([], {"PYTHONPATH": other})}
    tok = Tokenizer.from_file(str(sb.MODEL_DIR / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    fixed = sb.workloads(tok)["fixed"]
    bodies = {k: sb.make_bodies(fixed, k) for _, k in POINTS}
    with contextlib.ExitStack() as stack:
        urls = {}
        for i, (name, (extra, env)) in enumerate(servers.items()):
            port = sb.free_port()
            argv = sb.warm_serve_argv(sb.MODEL_DIR, [*sb.OURS_ARGS, "--compile", *extra])(port)
            ready = sb.COMPILED_READY_TIMEOUT_S
            urls[name] = stack.enter_context(
                sb.server(f"ab-{i}", argv, port, env=env, ready_timeout_s=ready)
            )
        for round_ in range(ROUNDS):
            for c, k in POINTS:
                for name, url in urls.items():
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
