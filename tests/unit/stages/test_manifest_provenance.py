"""Manifests hold no clock reading, name run measurements (not hashed), record versions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rslora_deploy.provenance import RUN_MEASUREMENTS
from rslora_deploy.stages.package import verify_manifest, write_manifest, write_model_card


def _package(root: Path, seconds: float) -> dict:
    (root / "model").mkdir(parents=True)
    (root / "model" / "model.onnx").write_bytes(b"graph")
    (root / "reports").mkdir()
    (root / "reports" / "build.json").write_text(json.dumps({"seconds": seconds}))
    body = {
        "inputs": {"base": {"name": "tiny"}},
        "profile": {"name": "p", "runtime": "r", "execution_provider": "cpu"},
        "budget": {"fits": True, "estimate_bytes": 1, "budget_bytes": 2},
    }
    write_model_card(root, {"tool": {"version": "0"}, **body}, "Run it.")
    return write_manifest(root, body, nondeterministic=list(RUN_MEASUREMENTS))


def test_two_runs_give_identical_manifests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    first = _package(tmp_path / "a", seconds=1.0)
    second = _package(tmp_path / "b", seconds=2.5)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (
        tmp_path / "b" / "manifest.json"
    ).read_bytes()
    assert "created_utc" not in first
    assert first == second
    assert [e["path"] for e in first["nondeterministic"]] == ["reports/build.json"]
    assert "reports/build.json" not in {e["path"] for e in first["files"]}
    assert first["tool"]["libraries"]["onnxruntime"]
    # The named file may change or be absent (archives leave it out); every hashed file may not.
    (tmp_path / "a" / "reports" / "build.json").write_text("{}")
    assert verify_manifest(tmp_path / "a") == []
    (tmp_path / "a" / "reports" / "build.json").unlink()
    assert verify_manifest(tmp_path / "a") == []
    (tmp_path / "a" / "README.md").unlink()
    assert verify_manifest(tmp_path / "a") == ["README.md: missing"]


def test_source_date_epoch_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    manifest = _package(tmp_path / "a", seconds=1.0)
    assert manifest["created_utc"] == "2023-11-14T22:13:20Z"
