"""Backend selection on a CPU machine."""

from __future__ import annotations

import importlib.util

import pytest

from rslora_deploy import backend


@pytest.fixture(autouse=True)
def _fresh_backend():
    backend.select_backend.cache_clear()
    yield
    backend.select_backend.cache_clear()


def test_cpu_selected_without_accelerators(monkeypatch):
    import torch

    monkeypatch.delenv(backend.ENV_DEVICE, raising=False)
    if torch.cuda.is_available() or backend.npu_available():
        pytest.skip("this machine has an accelerator")
    chosen = backend.select_backend()
    assert (chosen.kind, chosen.device) == ("cpu", "cpu")
    chosen.synchronize()
    chosen.reset_peak_memory()
    assert chosen.peak_memory_bytes() >= backend.current_rss_bytes() > 10 * 2**20


@pytest.mark.skipif(
    importlib.util.find_spec("torch_npu") is not None,
    reason="torch_npu is installed on this machine; the test is about one without it",
)
def test_npu_absent_is_false_without_import(monkeypatch):
    import importlib

    def refuse(name, *args):
        raise AssertionError(f"npu_available imported {name} although torch_npu is absent")

    monkeypatch.setattr(importlib, "import_module", refuse)
    assert backend.npu_available() is False


def test_forced_device(monkeypatch):
    monkeypatch.setenv(backend.ENV_DEVICE, "cpu")
    assert backend.select_backend().kind == "cpu"
    backend.select_backend.cache_clear()
    monkeypatch.setenv(backend.ENV_DEVICE, "tpu")
    with pytest.raises(ValueError, match="use cuda, npu or cpu"):
        backend.select_backend()


def test_npu_import_failure_is_not_fatal(monkeypatch):
    """torch_npu present but broken (no CANN) -> CPU, never an exception."""
    import importlib

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())

    def broken(name):
        raise RuntimeError("Failed to load the backend extension: torch_npu")

    monkeypatch.setattr(importlib, "import_module", broken)
    assert backend.npu_available() is False
