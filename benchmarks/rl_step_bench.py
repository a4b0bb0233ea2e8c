"""Benchmark one `warm-rl` training step: reward over HTTP versus the same RM in-process.

Run:  .venv/bin/python benchmarks/rl_step_bench.py [--steps S] [--rounds R] [--append]

Target (from the issue): the step time with the reward served over HTTP is at most 1.1x the
step time with the same reward model called in-process (same model, same batch), measured
in one run.

The reward model: the packaged MiniLM (BERT, 6 layers) with a fresh 1-label head (seed 1234,
as in serve_bench.py), saved once per run to a temporary directory. The policy: a random
GPT-2 LM (n_embd 256, 4 layers, 4 heads, seed 0) over the MiniLM tokenizer's vocabulary,
so decoded completions are real word pieces; [SEP] is its EOS (a random policy almost never
samples it, so completions are --max-new-tokens long).

Two modes, each a real `rl_client.trainer.train` run on the CPU (--steps steps, fresh
output directory, same seed, so both modes see the same prompts and the same samples):
  remote:     `warm-serve` (this Python, `-m service.cli`, default settings, CPU) in a
              subprocess; the trainer's own RewardClient sends each step's batch and keeps
              computing the reference and policy forward passes while it is scored.
  in-process: `InProcessScorer`: the service's own loader builds the same Encoder (render,
              tokenise, max_length, left truncation, separator) and TransformersBackend
              (fp32, inference_mode, right padding); each step's batch is scored
              synchronously in one forward pass before the trainer's forward passes.
The first step of every run is a warm-up and is dropped. Modes alternate in rounds
(remote first in odd rounds, in-process first in even ones) so drift moves both. Figures
are medians over the kept steps of all rounds; the ratio is the one target figure.

The setting measured: one 2-core machine where the `warm-serve` process and the trainer
share the cores (a co-located RM server), both with torch's default thread count (2 here)
unless --server-threads is given, so while a remote batch is scored 4 threads compete for
2 cores. --server-threads 1 avoids that oversubscription (in short smoke runs it about
halved the remote reward latency; its effect on step time was within the noise). The
server starts once and idles during in-process runs.

Columns: step = wall time of one step; sample = generation; reward = the reward call
(remote: send to answer, overlapping the forward passes; in-process: the scorer's own
synchronous time, since its future is already done when returned); wait = time the step
blocked on the reward after its forward passes.

Without --append the table is only printed; with it the section is also appended, with the
date, command and machine, to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench_report import machine_description, markdown_table, publish
from serve_bench import ensure_model, free_port, say, server, software

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "RESULTS.md"

if TYPE_CHECKING:
    from rl_client.client import ScoreBatch

MAX_RATIO = 1.1  # target: remote step time <= 1.1 x in-process step time
CHECK_TOLERANCE = 1e-4  # in-process vs remote rewards on one batch
POLICY_SEED = 0
POLICY_SHAPE = {"n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 256}
MODES = ("remote", "in-process")
Kept = dict[str, list[dict[str, float]]]  # the kept step records of each mode


# The in-process scorer -------------------------------------------------------------------


class InProcessScorer:
    """The trainer's `Scorer`, computing rewards in this process exactly as warm-serve does."""

    def __init__(self, model_dir: Path) -> None:
        from service.loader import load_model
        from service.settings import Settings

        # The service's loader with its default settings: same Encoder (max_length from the
        # model, separator) and backend; no warm-up, whose calibration only tunes batching.
        self.settings = Settings(
            model=model_dir, device="cpu", warmup=False, batch_overhead_tokens=0.0
        )
        loaded = load_model(self.settings)
        self.encoder = loaded.encoder
        self.backend = loaded.backend
        self.seconds: list[float] = []  # time of each score_future call

    def score(self, items: Sequence[Any], truncation_side: str | None = None) -> ScoreBatch:
        """Rewards of `items` in order: one right-padded forward pass over all of them."""
        from rl_client.client import ScoreBatch, to_item
        from service.protocol import ScoreResult

        encoded = self.encoder.encode(
            [to_item(x) for x in items], truncation_side or self.settings.truncation_side
        )
        outputs = self.backend.forward([e.ids for e in encoded])  # (n, num_labels) float64
        rewards = outputs[:, self.settings.reward_index]
        results: list[ScoreResult | None] = [
            ScoreResult(
                index=i,
                reward=float(rewards[i]),
                rewards=[float(x) for x in outputs[i]] if outputs.shape[1] > 1 else None,
                n_tokens=len(e.ids),
                truncated=e.truncated,
            )
            for i, e in enumerate(encoded)
        ]
        return ScoreBatch(results=results)

    def score_future(self, items: Sequence[Any], **options: Any) -> Future[ScoreBatch]:
        """Score synchronously; return an already-completed future holding the batch."""
        start = time.perf_counter()
        future: Future[ScoreBatch] = Future()
        future.set_result(self.score(items, options.get("truncation_side")))
        self.seconds.append(time.perf_counter() - start)
        return future


# Models ----------------------------------------------------------------------------------


def make_policy(out: Path, tokenizer_dir: Path) -> Path:
    """A random GPT-2 LM over the MiniLM tokenizer's vocabulary, saved with that tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.eos_token = tok.sep_token
    tok.model_input_names = ["input_ids", "attention_mask"]  # no token_type_ids into GPT-2
    config = GPT2Config(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        **POLICY_SHAPE,
    )
    torch.manual_seed(POLICY_SEED)
    GPT2LMHeadModel(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


# Measurement -----------------------------------------------------------------------------


def train_config(args: argparse.Namespace, policy: Path, out: Path, url: str) -> Any:
    """The TrainConfig of one measured run."""
    from rl_client.config import TrainConfig

    return TrainConfig(
        policy=policy,
        out=out,
        reward_url=url,
        steps=args.steps,
        prompts_per_step=args.prompts_per_step,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        device="cpu",
        resume=False,
        console=False,
    )


def check_rewards(
    args: argparse.Namespace, policy_dir: Path, scorer: InProcessScorer, url: str
) -> tuple[float, int]:
    """Max |reward diff| (and item count) between in-process and remote on one sampled batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl_client.client import RewardClient
    from rl_client.rollout import DEFAULT_PROMPTS, sample

    torch.manual_seed(POLICY_SEED)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    prompts = [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(args.prompts_per_step)]
    items = sample(
        policy, tok, prompts, args.group_size, max_new_tokens=args.max_new_tokens, temperature=1.0
    ).items()
    local = scorer.score(items).results
    with RewardClient(url) as client:
        remote = client.score(items).results
    diff = 0.0
    for a, b in zip(local, remote, strict=True):
        if a is None or b is None:
            raise RuntimeError("an item of the check batch got no reward")
        if (a.n_tokens, a.truncated) != (b.n_tokens, b.truncated):
            raise RuntimeError(f"item {a.index}: tokens differ in-process vs remote: {a} / {b}")
        diff = max(diff, abs(a.reward - b.reward))
    if diff > CHECK_TOLERANCE:
        raise RuntimeError(f"in-process and remote rewards differ by {diff:.2e}")
    return diff, len(items)


def measure(
    args: argparse.Namespace, policy: Path, scorer: InProcessScorer, url: str, work: Path
) -> Kept:
    """Kept step records per mode, rounds alternating which mode goes first."""
    from rl_client.trainer import train

    kept: Kept = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            cfg = train_config(args, policy, work / f"round{r}-{mode}", url)
            calls = len(scorer.seconds)
            history = train(cfg, scorer=scorer if mode == "in-process" else None)
            records = history[1:]  # the first step is a warm-up
            if mode == "in-process":
                for record, seconds in zip(records, scorer.seconds[calls + 1 :], strict=True):
                    record["reward_s"] = seconds
            kept[mode] += records
            step_s = statistics.median(x["step_s"] for x in records)
            say(f"  round {r + 1}/{args.rounds} {mode:>10}: median step {step_s:.3f} s")
    return kept


# Report ----------------------------------------------------------------------------------


def median(records: list[dict[str, float]], key: str) -> float:
    """The median of one field over the kept steps."""
    return statistics.median(r[key] for r in records)


def render(kept: Kept, check: tuple[float, int], title: str, context: list[str]) -> str:
    """The markdown section for RESULTS.md (also printed)."""
    header = ["mode", "steps kept", "step s", "sample s", "reward s", "wait s", "step / in-process"]
    base = median(kept["in-process"], "step_s")
    rows = [
        [
            mode,
            str(len(recs)),
            f"{median(recs, 'step_s'):.3f}",
            f"{median(recs, 'sample_s'):.3f}",
            f"{median(recs, 'reward_s'):.3f}",
            f"{median(recs, 'reward_wait_s'):.3f}",
            f"{median(recs, 'step_s') / base:.3f}",
        ]
        for mode, recs in kept.items()
    ]
    ratio = median(kept["remote"], "step_s") / base
    verdict = "met" if ratio <= MAX_RATIO else "not met"
    pairs = zip(kept["remote"], kept["in-process"], strict=False)
    same = max(abs(a["reward"] - b["reward"]) for a, b in pairs if a["step"] == b["step"])
    notes = [
        f"Reward check on one sampled batch ({check[1]} items): max |in-process - remote| "
        f"{check[0]:.1e} (tolerance {CHECK_TOLERANCE:g}); token counts and truncation equal.",
        f"Same batches in both modes: max |mean reward diff| per step {same:.1e}.",
        "reward s: remote = send to answer (overlaps the forward passes); in-process = the "
        "synchronous scoring call. wait s: time blocked on the reward after the forward passes.",
    ]
    return "\n\n".join(
        [
            f"## RL step benchmark, {title}",
            "\n".join(f"- {line}" for line in context),
            markdown_table(header, rows),
            f"Target: remote step <= {MAX_RATIO}x in-process step: {ratio:.3f}x -> {verdict}",
            "Notes:\n" + "\n".join(f"- {n}" for n in notes),
        ]
    )


# Entry point -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="steps per run (the first is dropped)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (remote, in-process)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts per step (B)")
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="completion length")
    p.add_argument("--server-threads", type=int, default=None, help="warm-serve --torch-threads")
    p.add_argument("--append", action="store_true", help="append the results to RESULTS.md")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step of every run is dropped)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Build the models, start warm-serve, check rewards, measure both modes, print (and record)."""
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the server child is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    logging.getLogger("rl_client").setLevel(logging.ERROR)
    started = dt.datetime.now(dt.timezone.utc)
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())

    with tempfile.TemporaryDirectory(prefix="rl-step-bench-") as tmp:
        work = Path(tmp)
        say("reward model and policy ...")
        rm = ensure_model(work / "rm")
        policy = make_policy(work / "policy", rm)
        scorer = InProcessScorer(rm)
        port = free_port()
        serve = [sys.executable, "-m", "service.cli", "--model", str(rm), "--device", "cpu"]
        if args.server_threads is not None:
            serve += ["--torch-threads", str(args.server_threads)]
        with server("rl-step-warm-serve", [*serve, "--port", str(port)], port) as url:
            check = check_rewards(args, policy, scorer, url)
            say(f"reward check: max |in-process - remote| = {check[0]:.2e} over {check[1]} items")
            kept = measure(args, policy, scorer, url, work / "runs")

    import torch

    elapsed = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    threads = "default" if args.server_threads is None else str(args.server_threads)
    section = render(
        kept,
        check,
        title=f"{started:%Y-%m-%d %H:%M} UTC",
        context=[
            f"Command: `{' '.join(sys.orig_argv)}` (took {elapsed:.0f} s)",
            f"Machine: {machine_description()}; load average at start {load_before} "
            "(anything else running skews every figure)",
            f"Software: {software()}",
            f"Step: {args.prompts_per_step} prompts x {args.group_size} completions x "
            f"{args.max_new_tokens} new tokens; policy random GPT-2 {POLICY_SHAPE}; RM MiniLM "
            f"(1-label head); per mode {args.rounds} run(s) of {args.steps} steps, the first "
            "step of each run dropped",
            f"Threads: trainer torch {torch.get_num_threads()}; warm-serve --torch-threads "
            f"{threads}; both share the machine's cores",
        ],
    )
    publish(RESULTS, section, args.append)


if __name__ == "__main__":
    main()
