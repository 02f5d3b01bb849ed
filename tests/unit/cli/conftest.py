"""Fixtures of the CLI tests: valid starting points the hostile-input cases break one thing in.

How a clean failure looks is asserted by :mod:`tests.unit.cli.clean_failure`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``tempfile`` at an empty folder, so a test can assert nothing was left in it."""
    folder = tmp_path / "systmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture(scope="session")
def small_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid tiny Llama directory (hidden 64, vocab 128, tied embeddings; ~150 KB)."""
    from rslora_deploy.testing.tiny import save_tiny, tiny_llama

    return save_tiny(
        tiny_llama(hidden=64, layers=2, kv_heads=2, seed=0, tie=True, vocab=128),
        tmp_path_factory.mktemp("hostile") / "base",
    )


@pytest.fixture
def fake_package(tmp_path: Path) -> Callable[[], Path]:
    """Factory for an intact package directory (manifest + hashed files; no real model)."""
    from rslora_deploy.stages.package import write_manifest

    def make(name: str = "pkg") -> Path:
        root = tmp_path / name
        (root / "model").mkdir(parents=True)
        (root / "model" / "model.onnx").write_bytes(b"graph" * 100)
        (root / "model" / "genai_config.json").write_text("{}")
        (root / "reports").mkdir()
        (root / "reports" / "budget.json").write_text('{"fits": true}')
        write_manifest(root, {"budget": {}}, created_utc="2026-01-01T00:00:00Z")
        return root

    return make
