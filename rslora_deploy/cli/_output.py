"""Result output shared by every CLI command: text for people, ``--format json`` for machines."""

from __future__ import annotations

import json
from enum import Enum
from typing import Any


class OutputFormat(str, Enum):
    """How results are printed on stdout."""

    TEXT = "text"
    JSON = "json"


def emit(data: dict[str, Any], fmt: OutputFormat, text: str) -> None:
    """Print ``data`` as JSON or ``text``, on stdout (logs and progress go to stderr)."""
    print(json.dumps(data, indent=2, default=str) if fmt is OutputFormat.JSON else text)
