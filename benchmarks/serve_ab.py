"""Interleaved A/B of `warm-serve --compile`: one forward at a time (`--model-workers 1`)
against forwards side by side (the default), on the serve_bench model and fixed workload.

Run:  .venv/bin/python benchmarks/serve_ab.py   (after serve_bench.py has made the model)

Both servers are up at once (each idle while the other is measured); every point runs
against one, then the other, for two rounds, so drift moves both and not their ratio.
Printed only: the figures go into the reading of a serve_bench section of RESULTS.md.
"""

from __future__ import annotations

import contextlib

import serve_bench as sb
from tokenizers import Tokenizer

SERVERS = {"one at a time": ["--model-workers", "1"], "side by side": []}
POINTS = [(32, 1), (128, 1), (32, 8)]  # (concurrency, items per request)
ROUNDS = 2
WARMUP_S, WINDOW_S = 2.0, 15.0


def main() -> None:
    tok = Tokenizer.from_file(str(sb.MODEL_DIR / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    fixed = sb.workloads(tok)["fixed"]
    bodies = {k: sb.make_bodies(fixed, k) for _, k in POINTS}
    with contextlib.ExitStack() as stack:
        urls = {}
        for name, extra in SERVERS.items():
            port = sb.free_port()
            argv = sb.warm_serve_argv(sb.MODEL_DIR, [*sb.OURS_ARGS, "--compile", *extra])(port)
            ready = sb.COMPILED_READY_TIMEOUT_S
            urls[name] = stack.enter_context(
                sb.server(name.replace(" ", "-"), argv, port, ready_timeout_s=ready)
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
