"""`warm-merge`: build, inspect, verify and diagnose WARM artifacts (parse, validate, delegate)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from merger.config import MergeSpec, Method
from merger.errors import MergeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
out = Console()
err = Console(stderr=True)


def _fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _spec_error(exc: ValidationError) -> NoReturn:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "options"
    _fail(f"{field}: {first['msg'].removeprefix('Value error, ')}")


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwind like Ctrl-C so the partial output directory is removed.
    raise KeyboardInterrupt


def _parse_weights(raw: str | None) -> tuple[float, ...] | None:
    if raw is None:
        return None
    try:
        return tuple(float(w) for w in raw.split(","))
    except ValueError:
        _fail(f"--weights: {raw!r} is not a comma-separated list of numbers")


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
    from merger.build import plan_merge, run_merge

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
        _spec_error(exc)
    try:
        plan = plan_merge(spec)
        if dry_run:
            _print_plan(plan)
            return
        signal.signal(signal.SIGTERM, _on_sigterm)
        show = progress and sys.stderr.isatty()
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            disable=not show,
        ) as bar:
            task = bar.add_task("merging", total=plan.bytes_to_read)
            manifest = run_merge(
                plan, out_dir, overwrite=force, progress=lambda n: bar.advance(task, n)
            )
    except MergeError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        err.print("interrupted: nothing was written")
        raise typer.Exit(130) from None
    out.print(f"wrote {out_dir} (fingerprint {manifest.fingerprint[:16]})")


def _print_plan(plan: object) -> None:
    from merger.build import MergePlan

    assert isinstance(plan, MergePlan)
    out.print(f"method {plan.spec.method.value}, {len(plan.members)} members")
    for member, weight in zip(plan.members, plan.weights, strict=True):
        out.print(f"  {weight:.6f}  {member.path}")
    if plan.init is not None:
        out.print(f"  init ({plan.init_weight:.6f})  {plan.init.path}")
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
        _fail(str(exc))
    if as_json:
        sys.stdout.write(manifest_bytes(manifest).decode())
        return
    merge = manifest.merge
    out.print(f"artifact     {artifact}")
    out.print(f"fingerprint  {manifest.fingerprint}")
    out.print(f"tool         {merge.tool} {merge.tool_version}")
    out.print(f"method       {merge.method}" + (f", liti eta={merge.liti}" if merge.liti else ""))
    out.print(f"output dtype {merge.output_dtype}")
    table = Table("weight", "input", "files (sha256)")
    for rec in merge.inputs:
        files = "\n".join(f"{n} {h[:16]}" for n, h in rec.files.items())
        table.add_row(f"{rec.weight:.6f}", rec.path, files)
    if merge.init is not None:
        files = "\n".join(f"{n} {h[:16]}" for n, h in merge.init.files.items())
        table.add_row(f"init {merge.init.weight:.6f}", merge.init.path, files)
    out.print(table)
    out.print("config " + json.dumps(merge.config, sort_keys=True))


@app.command()
def verify(artifact: Annotated[Path, typer.Argument(help="A WARM artifact directory.")]) -> None:
    """Re-hash an artifact and check it against its manifest (exit 1 on any mismatch)."""
    from merger.manifest import verify_artifact

    try:
        manifest = verify_artifact(artifact)
    except MergeError as exc:
        _fail(str(exc))
    out.print(f"ok: {len(manifest.files)} files match (fingerprint {manifest.fingerprint[:16]})")


if __name__ == "__main__":
    app()
