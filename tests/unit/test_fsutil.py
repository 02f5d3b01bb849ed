"""_fsutil: one SHA-256 file hash, one staged (atomic) output directory, one JSON writer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from rslora_deploy._fsutil import atomic_new_dir, sha256_file, staged_output, write_json
from rslora_deploy.errors import ConfigError, InputError


def _fill(root: Path) -> None:
    (root / "model").mkdir()
    (root / "model" / "model.onnx").write_bytes(b"graph")


def test_sha256_file_streams_the_whole_file(tmp_path: Path) -> None:
    data = bytes(range(256)) * 41  # not a multiple of the chunk below
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path, chunk=1000) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == sha256_file(path, chunk=7)


def test_write_json_round_trips_with_newline(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json(path, {"a": [1, 2.5], "where": tmp_path})
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert json.loads(text) == {"a": [1, 2.5], "where": str(tmp_path)}


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


def test_package_dir_gets_umask_permissions(tmp_path: Path) -> None:
    import os

    umask = os.umask(0o022)
    try:
        with staged_output(tmp_path / "pkg", overwrite=False) as staging:
            _fill(staging)
    finally:
        os.umask(umask)
    assert (tmp_path / "pkg").stat().st_mode & 0o777 == 0o755


def test_atomic_new_dir_refuses_existing_output(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(ConfigError, match="choose a new --out"), atomic_new_dir(tmp_path / "out"):
        pass
    assert (tmp_path / "out" / "x").read_text() == "x"
