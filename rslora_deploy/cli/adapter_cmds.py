"""CLI commands of one pipeline area, attached to the main app by ``register``."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach this module's commands to ``app`` (filled in by its stage's work)."""
