"""`warm-merge`: fine-tune, build, inspect, verify, diagnose and calibrate WARM artifacts (parse,
validate, delegate)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from merger.checkpoints import input_files
from merger.config import MergeSpec, Method
from merger.console import err, fail, out, progress_bars, spec_error
from merger.errors import MergeError
from merger.formatting import DEFAULT_SEPARATOR
from merger.hashing import FileHashes
from merger.recipe.cli import finetune

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwind like Ctrl-C so the partial output directory is removed.
    raise KeyboardInterrupt


def _early_hashes(spec: MergeSpec, dry_run: bool) -> FileHashes:
    """Start hashing the input files now, before torch is imported (none for a dry run, or
    when an input's layout is wrong: planning then reports it)."""
    paths = [*spec.inputs, *([spec.init] if spec.init is not None else [])]
    try:
        files = [] if dry_run else [f for p in paths for f in input_files(p)]
    except MergeError:
        files = []
    return FileHashes(files)


def _parse_weights(raw: str | None) -> tuple[float, ...] | None:
    if raw is None:
        return None
    try:
        return tuple(float(w) for w in raw.split(","))
    except ValueError:
        fail(f"--weights: {raw!r} is not a comma-separated list of numbers")


@app.command()
def build(
    checkpoints: Annotated[list[Path], typer.Argument(help="Member RMs: HF dirs or .safetensors.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Artifact directory to create.")],
    method: Annotated[
        Method, typer.Option(help="average (WARM) or slerp (WARP).")
    ] = Method.average,
    weights: Annotated[
        str | None, typer.Option(help="Comma-separated non-negative weights, e.g. 1,1,2.")
    ] = None,
    init: Annotated[Path | None, typer.Option(help="Shared initialisation (slerp, liti).")] = None,
    liti: Annotated[
        float | None, typer.Option(help="Interpolate toward --init: (1-eta)*init + eta*merged.")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Output dtype: float32, bfloat16 or float16.")
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option(help="Bytes per output shard (e.g. 2000000000, 500MB, 2GiB).")
    ] = "5GB",
    allow_multi_head: Annotated[bool, typer.Option(help="Accept num_labels > 1.")] = False,
    ignore_config_key: Annotated[
        list[str] | None, typer.Option(help="A config.json key allowed to differ (repeatable).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the plan; write nothing.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Merge M reward-model checkpoints into one verified WARM artifact."""
    try:
        spec = MergeSpec(
            inputs=tuple(checkpoints),
            method=method,
            weights=_parse_weights(weights),
            init=init,
            liti=liti,
            dtype=dtype,
            max_shard_size=max_shard_size,  # a size string, parsed by the validator
            allow_multi_head=allow_multi_head,
            ignore_config_keys=tuple(ignore_config_key or ()),
        )
    except ValidationError as exc:
        spec_error(exc)
    with _early_hashes(spec, dry_run) as hashes:
        from merger.build import run_merge  # torch: imported while hashing runs
        from merger.plan import plan_merge

        try:
            plan = plan_merge(spec)
            if dry_run:
                _print_plan(plan)
                return
            signal.signal(signal.SIGTERM, _on_sigterm)
            with progress_bars(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                enabled=progress,
            ) as bar:
                task = bar.add_task("merging", total=plan.bytes_to_read)
                manifest = run_merge(
                    plan,
                    out_dir,
                    overwrite=force,
                    progress=lambda n: bar.advance(task, n),
                    hashes=hashes,
                )
        except MergeError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            err.print("interrupted: nothing was written")
            raise typer.Exit(130) from None
    out.print(f"wrote {out_dir} (fingerprint {manifest.fingerprint[:16]})")


def _print_plan(plan: object) -> None:
    from merger.plan import MergePlan, provenance

    assert isinstance(plan, MergePlan)
    record = provenance(plan, None)
    out.print(f"method {plan.spec.method.value}, {len(plan.members)} members")
    for member in record.inputs:
        out.print(f"  {member.weight:.6f}  {member.path}")
    if record.init is not None:
        out.print(f"  init ({record.init.weight:.6f})  {record.init.path}")
    out.print(f"tensors {len(plan.tensors)}")
    out.print(f"bytes to read {plan.bytes_to_read:,}")
    out.print(f"bytes to write {plan.bytes_to_write:,}")
    table = Table("shard", "tensors", "bytes")
    for shard in plan.shards:
        table.add_row(shard.name, str(len(shard.tensors)), f"{shard.nbytes:,}")
    out.print(table)


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help="A WARM artifact directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw manifest.")] = False,
) -> None:
    """Print an artifact's provenance (its manifest)."""
    from merger.manifest import manifest_bytes, read_manifest

    try:
        manifest = read_manifest(artifact)
    except MergeError as exc:
        fail(str(exc))
    if as_json:
        sys.stdout.write(manifest_bytes(manifest).decode())
        return
    merge = manifest.merge
    out.print(f"artifact     {artifact}")
    out.print(f"fingerprint  {manifest.fingerprint}")
    out.print(f"tool         {merge.tool} {merge.tool_version}")
    out.print(f"method       {merge.method}" + (f", liti eta={merge.liti}" if merge.liti else ""))
    out.print(f"output dtype {merge.output_dtype}")
    records = [("input", r) for r in merge.inputs]
    records += [("init", merge.init)] if merge.init is not None else []
    for role, rec in records:
        out.print(f"{role:<12} {rec.weight:.6f}  {rec.path}", soft_wrap=True, highlight=False)
        for name, digest in rec.files.items():
            out.print(f"{'':<14}{digest}  {name}", soft_wrap=True, highlight=False)
    out.print("config       " + json.dumps(merge.config, sort_keys=True), soft_wrap=True)


@app.command()
def verify(artifact: Annotated[Path, typer.Argument(help="A WARM artifact directory.")]) -> None:
    """Re-hash an artifact and check it against its manifest (exit 1 on any mismatch)."""
    from merger.manifest import verify_artifact

    try:
        manifest = verify_artifact(artifact)
    except MergeError as exc:
        fail(str(exc))
    out.print(f"ok: {len(manifest.files)} files match (fingerprint {manifest.fingerprint[:16]})")


@app.command()
def diagnose(
    checkpoints: Annotated[
        list[Path], typer.Argument(help="Member RM dirs; the curve runs from the 1st to the 2nd.")
    ],
    data: Annotated[
        Path, typer.Option(help="Preference pairs: JSONL of prompt, chosen, rejected.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for diagnose.json and .png.")],
    steps: Annotated[int, typer.Option(min=2, help="Lambda values from 0 to 1.")] = 11,
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per forward pass.")] = 16,
    max_length: Annotated[int, typer.Option(min=1, help="Tokens per text (truncated).")] = 256,
    evaluate: Annotated[
        list[Path] | None,
        typer.Option(
            "--eval",
            help="An evaluation set (JSONL pairs; repeatable, e.g. ID and shifted): says "
            "whether the uniform WA loses to the best member there.",
        ),
    ] = None,
) -> None:
    """Linear mode connectivity: accuracy of weight vs reward averaging along lambda; with
    --eval, a verdict per evaluation set: WA against ENS and the best member."""
    from merger.diagnose import diagnose as run_diagnose
    from merger.diagnose import lambda_grid, write_report
    from merger.preferences import read_preferences

    try:
        prefs = read_preferences(data)
        evaluations = {path.name: read_preferences(path) for path in evaluate or []}
        with err.status(f"scoring {len(prefs)} pairs with {len(checkpoints)} models"):
            diag = run_diagnose(
                checkpoints,
                prefs,
                lambdas=lambda_grid(steps),
                batch_size=batch_size,
                max_length=max_length,
                evaluations=evaluations,
            )
        json_path, png_path = write_report(diag, out_dir)
    except (MergeError, ValueError) as exc:
        fail(str(exc))
    table = Table("lambda", "WA acc", "ENS acc", "chord", "agreement", title="A -> B")
    for p in diag.curve:
        row = (p.lam, p.wa_accuracy, p.ens_accuracy, p.chord, p.agreement)
        table.add_row(*(f"{v:.3f}" for v in row))
    out.print(table)
    for i, member in enumerate(diag.members):
        out.print(f"member {i} accuracy {member.accuracy:.3f}  {member.path}", highlight=False)
    if diag.uniform is not None:
        u = diag.uniform
        out.print(
            f"uniform M={u.members}: WA {u.wa_accuracy:.3f}, ENS {u.ens_accuracy:.3f}, "
            f"agreement {u.agreement:.3f}"
        )
    out.print(f"barrier {diag.barrier:+.3f} (<= 0: linearly mode connected)")
    for v in diag.verdicts:
        out.print(
            f"{v.name} ({v.pairs} pairs): WA {v.wa_accuracy:.3f}, ENS {v.ens_accuracy:.3f}, "
            f"best member {v.best_member} {v.best_accuracy:.3f}; WA - best "
            f"{v.wa_accuracy - v.best_accuracy:+.3f} (standard error {v.standard_error:.3f})",
            highlight=False,
        )
        if v.loses:
            err.print(
                f"warning: on {v.name}, averaging loses: WA is more than two standard errors "
                f"below member {v.best_member} (finetune --select greedy leaves such members "
                "out)",
                highlight=False,
            )
    out.print(f"wrote {json_path} and {png_path}", highlight=False, soft_wrap=True)


@app.command()
def calibrate(
    artifact: Annotated[Path, typer.Argument(help="A WARM artifact directory (updated in place).")],
    data: Annotated[
        Path, typer.Option(help="Preference pairs: JSONL of prompt, chosen, rejected.")
    ],
    golden: Annotated[
        int, typer.Option(min=0, help="Responses in the golden set the server checks at startup.")
    ] = 64,
    holdout: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of pairs held out of the fit.")
    ] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the fit / held-out split.")] = 0,
    max_length: Annotated[int, typer.Option(min=1, help="Tokens per response (truncated).")] = 512,
    separator: Annotated[
        str, typer.Option(help="Between prompt and response, for models without a chat template.")
    ] = DEFAULT_SEPARATOR,
    truncation_side: Annotated[
        str, typer.Option(help="Where over-long responses are cut: left or right.")
    ] = "left",
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per forward pass.")] = 16,
) -> None:
    """Record what the artifact's rewards mean: statistics, a Bradley-Terry temperature and a
    golden set, in warm_calibration.json (the manifest and fingerprint are updated)."""
    from merger.calibration import calibrate_artifact
    from merger.manifest import read_manifest
    from merger.preferences import pairs_sha256, read_preferences

    if truncation_side not in {"left", "right"}:
        fail(f"--truncation-side {truncation_side!r}: left or right")
    try:
        pairs = read_preferences(data)
        with err.status(f"scoring {len(pairs)} pairs"):
            calibration = calibrate_artifact(
                artifact,
                (data.name, pairs_sha256(pairs)),
                pairs,
                golden=golden,
                holdout=holdout,
                seed=seed,
                max_length=max_length,
                separator=separator,
                truncation_side=truncation_side,
                batch_size=batch_size,
            )
    except (MergeError, ValueError, OSError) as exc:
        fail(str(exc))
    r, t = calibration.rewards, calibration.temperature
    out.print(f"rewards of {r.count} responses: mean {r.mean:.4g}, std {r.std:.4g}")
    out.print(
        f"temperature {t.value:.4g} (fit on {t.fit_pairs} pairs); held-out {t.after.pairs} "
        f"pairs: accuracy {t.after.accuracy:.3f}, log-loss {t.before.log_loss:.4f} at T=1 -> "
        f"{t.after.log_loss:.4f}"
    )
    out.print(f"golden set: {len(calibration.golden)} responses")
    if len(calibration.golden) < min(golden, calibration.rewards.count):
        err.print(
            f"warning: a golden set of {len(calibration.golden)}, not {golden}: the other "
            f"responses were truncated at --max-length {max_length}",
            highlight=False,
        )
    manifest = read_manifest(artifact)
    out.print(f"fingerprint {manifest.fingerprint[:16]}", highlight=False)


app.command()(finetune)  # the recipe's command, listed after the merge's own

if __name__ == "__main__":
    app()
