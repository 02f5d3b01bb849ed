"""CLI of the stage cache (rslora_deploy.stages.cache): ``cache ls`` and ``cache clear``."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from rslora_deploy.cli._output import OutputFormat, emit

cache_app = typer.Typer(help="Stage cache (reused stage outputs).", no_args_is_help=True)


@cache_app.command("ls")
def cache_ls(
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="text or json.")
    ] = OutputFormat.TEXT,
) -> None:
    """List the complete cache entries: stage, key, size, age."""
    from rslora_deploy.stages.cache import StageCache

    cache = StageCache()
    entries = cache.entries()
    rows = [
        f"{e.stage:14s} {e.key[:16]}  {e.bytes / 2**20:9.1f} MiB  "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(e.created))}"
        for e in entries
    ]
    total = sum(e.bytes for e in entries)
    rows.append(f"{len(entries)} entries, {total / 2**20:.1f} MiB in {cache.root}")
    payload = {
        "root": str(cache.root),
        "entries": [
            {"stage": e.stage, "key": e.key, "bytes": e.bytes, "path": str(e.path)} for e in entries
        ],
    }
    emit(payload, fmt, "\n".join(rows))


@cache_app.command("clear")
def cache_clear(
    stage: Annotated[str | None, typer.Option(help="Only this stage's entries.")] = None,
) -> None:
    """Remove cache entries (each under its lock, so a build writing one is not disturbed)."""
    from rslora_deploy.stages.cache import StageCache

    cache = StageCache()
    removed = cache.clear(stage)
    print(f"removed {removed} entries from {cache.root}")


def register(app: typer.Typer) -> None:
    """Attach the ``cache`` group to ``app``."""
    app.add_typer(cache_app, name="cache")
