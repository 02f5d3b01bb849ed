"""Shared pieces of the hostile-input suite: how a clean failure looks, and valid starting points.

Every case builds one malformed input in a temporary directory from a valid one, runs the real
CLI entry point in-process and asserts: exit code 1, exactly one ``error`` line that names the
problem, no traceback, and nothing at the target (no --out, no staging or temporary leftovers).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from rslora_deploy.cli.app import main


def assert_clean_failure(
    argv: list[str], capsys: pytest.CaptureFixture[str], target: Path, *needles: str
) -> str:
    """Run the CLI; assert exit 1, one error line holding every needle, nothing at ``target``."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not target.exists(), f"{target} exists after a failed command"
    leftovers = [p.name for p in target.parent.glob(f".{target.name}*")]
    assert not leftovers, leftovers
    return lines[0]


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
