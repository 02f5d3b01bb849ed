"""Package staging and manifest: atomic placement, hashes that catch tampering."""

from __future__ import annotations

from pathlib import Path

import pytest

from rslora_deploy.errors import ConfigError, InputError
from rslora_deploy.stages.package import staged_output, verify_manifest, write_manifest


def _fill(root: Path) -> None:
    (root / "model").mkdir()
    (root / "model" / "model.onnx").write_bytes(b"graph")
    (root / "reports").mkdir()
    (root / "reports" / "budget.json").write_text("{}")


def test_staged_output_places_package_atomically(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "pkg"
    with staged_output(target, overwrite=False) as staging:
        assert staging.parent == target.parent
        assert staging != target
        assert not target.exists()
        _fill(staging)
        write_manifest(staging, {"budget": {}})
    assert (target / "manifest.json").is_file()
    assert verify_manifest(target) == []
    assert [p.name for p in target.parent.iterdir()] == ["pkg"]


def _fail_while_staging(target: Path) -> None:
    with staged_output(target, overwrite=False) as staging:
        _fill(staging)
        raise InputError("boom")


def test_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "new" / "pkg"
    with pytest.raises(InputError):
        _fail_while_staging(target)
    assert not (tmp_path / "new").exists()


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "pkg"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--overwrite"), staged_output(target, overwrite=False):
        pass
    assert (target / "keep.txt").read_text() == "mine"
    with staged_output(target, overwrite=True) as staging:
        _fill(staging)
    assert not (target / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_manifest_detects_tampering(tmp_path: Path) -> None:
    _fill(tmp_path)
    manifest = write_manifest(tmp_path, {"budget": {}})
    assert {e["path"] for e in manifest["files"]} == {"model/model.onnx", "reports/budget.json"}
    (tmp_path / "model" / "model.onnx").write_bytes(b"grapH")
    (tmp_path / "extra.bin").write_bytes(b"x")
    problems = verify_manifest(tmp_path)
    assert any("model/model.onnx" in p for p in problems)
    assert any("extra.bin: not listed" in p for p in problems)


def test_package_dir_gets_umask_permissions(tmp_path: Path) -> None:
    import os

    umask = os.umask(0o022)
    try:
        with staged_output(tmp_path / "pkg", overwrite=False) as staging:
            _fill(staging)
    finally:
        os.umask(umask)
    assert (tmp_path / "pkg").stat().st_mode & 0o777 == 0o755
