"""The `warm-merge` commands' consoles and their one-line failures."""

from __future__ import annotations

from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import Progress, ProgressColumn

out = Console()
err = Console(stderr=True)


def progress_bars(*columns: str | ProgressColumn, enabled: bool = True) -> Progress:
    """Progress bars on stderr, shown only when it is a terminal (and `enabled`): a job run
    by CI or piped to a file prints its result lines only."""
    return Progress(*columns, console=err, disable=not (enabled and err.is_terminal))


def fail(message: str) -> NoReturn:
    """Print `error: message` on stderr and exit 1."""
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def spec_error(exc: ValidationError) -> NoReturn:
    """Fail with the first validation error, named by its field."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "options"
    fail(f"{field}: {first['msg'].removeprefix('Value error, ')}")
