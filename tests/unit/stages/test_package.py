"""Package staging and manifest: atomic placement, hashes that catch tampering."""

from __future__ import annotations

from pathlib import Path

from rslora_deploy._fsutil import staged_output
from rslora_deploy.stages.package import verify_manifest, write_manifest


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


def test_manifest_detects_tampering(tmp_path: Path) -> None:
    _fill(tmp_path)
    manifest = write_manifest(tmp_path, {"budget": {}})
    assert {e["path"] for e in manifest["files"]} == {"model/model.onnx", "reports/budget.json"}
    (tmp_path / "model" / "model.onnx").write_bytes(b"grapH")
    (tmp_path / "extra.bin").write_bytes(b"x")
    problems = verify_manifest(tmp_path)
    assert any("model/model.onnx" in p for p in problems)
    assert any("extra.bin: not listed" in p for p in problems)
