"""The reproduction's reward models: M MiniLM RMs fine-tuned on 25%-corrupted preferences.

One shared setup feeds every experiment, as in the paper's corrupted-label runs:
  * data from `merger.recipe.prefdata`: a training set whose labels are flipped with probability
    `noise` (the flipped pairs are known), a clean in-distribution validation set and a clean
    out-of-distribution test set;
  * `warm-merge finetune`: `members` MiniLM reward models from one shared initialisation,
    cycling through learning-rate and dropout grids with their own seeds and data orders;
  * WARM artifacts: the uniform weight average of the best M members (by validation accuracy)
    for each M asked for; M = 1 is the best single RM.
Everything is cached under the work directory, so a rerun only recomputes what changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from merger.build import run_merge
from merger.config import MergeSpec
from merger.manifest import MANIFEST_NAME
from merger.plan import plan_merge
from merger.recipe import prefdata
from merger.recipe.cli import MemberBars
from merger.recipe.finetune import FinetuneReport, FinetuneSpec, finetune, load_rm, pair_rewards
from merger.recipe.prefdata import PrefPair

Log = Callable[[str], None]


@dataclass(frozen=True)
class Setup:
    """What the reward models are trained on and how."""

    base: Path
    train_pairs: int = 768
    eval_pairs: int = 256
    noise: float = 0.25
    members: int = 6
    learning_rates: tuple[float, ...] = (2e-4, 1e-4)
    dropouts: tuple[float, ...] = (0.1, 0.0)
    epochs: float = 2.0
    batch_size: int = 16
    max_length: int = 96
    seed: int = 0


@dataclass(frozen=True)
class Data:
    """The splits: noisy training pairs (flips marked), clean validation and OOD pairs."""

    train: list[PrefPair]
    val: list[PrefPair]
    ood: list[PrefPair]

    @property
    def corrupted(self) -> list[PrefPair]:
        """Training pairs whose label was flipped, as the model saw them."""
        return [p for p in self.train if p.flipped]

    @property
    def clean_train(self) -> list[PrefPair]:
        """Training pairs whose label is right."""
        return [p for p in self.train if not p.flipped]


def make_data(setup: Setup) -> Data:
    """The three splits, deterministic in `setup.seed`."""
    s = setup.seed
    return Data(
        train=prefdata.generate("train", setup.train_pairs, seed=s, noise=setup.noise),
        val=prefdata.generate("val", setup.eval_pairs, seed=s + 1, noise=0.0),
        ood=prefdata.generate("ood", setup.eval_pairs, seed=s + 2, noise=0.0),
    )


def train_members(
    setup: Setup, data: Data, root: Path, log: Log, bars: Progress | None = None
) -> FinetuneReport:
    """Fine-tune (or reuse) every member, each with its bar on `bars`; no merge here, see
    `warm_artifacts`."""
    spec = FinetuneSpec(
        base=setup.base,
        out=root / "members",
        members=setup.members,
        learning_rates=setup.learning_rates,
        dropouts=setup.dropouts,
        epochs=setup.epochs,
        batch_size=setup.batch_size,
        max_length=setup.max_length,
        seed=setup.seed,
        merge=False,
    )
    steps = MemberBars(setup.members, bars).update if bars is not None else None
    return finetune(spec, data.train, data.val, log=log, steps=steps)


def warm_artifacts(report: FinetuneReport, sizes: Sequence[int], root: Path) -> dict[int, Path]:
    """For each M: the weight average of the best M members (M = 1: the best member itself)."""
    out: dict[int, Path] = {}
    for m in sizes:
        best = report.ranking[:m]
        if m == 1:
            out[m] = Path(best[0].path)
            continue
        dest, key_file = root / f"warm-{m}", root / f"warm-{m}.key"
        key = json.dumps(sorted(r.key for r in best))
        fresh = key_file.is_file() and key_file.read_text() == key
        if not (fresh and (dest / MANIFEST_NAME).is_file()):
            inputs = tuple(Path(r.path) for r in best)
            run_merge(plan_merge(MergeSpec(inputs=inputs)), dest, overwrite=True)
            key_file.write_text(key)
        out[m] = dest
    return out


def margins(path: Path, pairs: Sequence[PrefPair], max_length: int) -> torch.Tensor:
    """reward(chosen) - reward(rejected) per pair, as labelled (flipped pairs as flipped)."""
    chosen, rejected = pair_rewards(*load_rm(path), pairs, max_length=max_length)
    return chosen - rejected


def rewards(path: Path, prompts: Sequence[str], responses: Sequence[str], max_length: int) -> Any:
    """One reward per (prompt, response), as the service would score it; [N] fp32."""
    from merger.formatting import render
    from merger.scoring import batch_texts, score_batches

    model, tokenizer = load_rm(path)
    texts = [
        render(tokenizer, prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)
    ]
    return score_batches(model, batch_texts(tokenizer, texts, 64, max_length))


def cached_json(path: Path, key: object, compute: Callable[[], Any]) -> Any:
    """`compute()` once per key: its JSON result is kept at `path` beside the key."""
    from merger.writer import atomic_file

    token = json.dumps(key, sort_keys=True, default=str)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == token:
            return saved["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as fh:
        fh.write(json.dumps({"key": token, "value": value}).encode())
    return value
