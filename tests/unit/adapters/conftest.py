"""Shared helpers for adapter tests: golden values and checkpoint builders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

GOLDEN_PATH = Path(__file__).resolve().parents[2] / "golden" / "rslora-golden-v1.json"


@pytest.fixture(scope="session")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN_PATH.read_text())
