"""A real build SIGKILLed during quantization, export and packaging, then rerun.

Each kill takes the build's whole process group (the exporter runs in a child). After each:
``--out`` is absent, or holds the previous complete package; the stage cache holds complete
entries only. Each rerun logs ``stage X: cached`` for every stage that had finished, and the
final all-cached rerun takes a fraction of the cold build's time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tiny_build import build_argv, build_env, make_inputs, run_build

from rslora_deploy.stages.cache import StageCache
from rslora_deploy.stages.package import verify_manifest

pytestmark = pytest.mark.slow


def _kill_at(argv: list[str], env: dict[str, str], log: Path, marker: str, delay: float) -> None:
    """Start a build, SIGKILL its process group ``delay`` s after ``marker`` appears in its log."""
    with log.open("w") as handle:
        proc = subprocess.Popen(argv, env=env, stderr=handle, start_new_session=True)
    deadline = time.monotonic() + 900
    while marker not in log.read_text():
        assert proc.poll() is None, f"build ended before {marker!r}:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {marker!r} in 900 s"
        time.sleep(0.005)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the build finished before it could be killed"


def _complete_entries(cache: Path) -> set[str]:
    return {entry.stage for entry in StageCache(cache).entries()}


def test_killed_builds_resume_from_finished_stages(tmp_path: Path) -> None:
    base, adapter, recipe = make_inputs(tmp_path / "inputs", hidden=512)
    cache = tmp_path / "stage-cache"
    env = build_env(cache)
    out = tmp_path / "pkg"
    argv = build_argv(base, adapter, recipe, out, "--overwrite")

    # 1. During quantization: the merge had finished and is kept; nothing at --out.
    _kill_at(argv, env, tmp_path / "1.log", "stage quantize: start", delay=0.1)
    assert "stage quantize: done" not in (tmp_path / "1.log").read_text()
    assert not out.exists()
    assert _complete_entries(cache) == {"merge_adapter"}

    # 2. During export (the builder child running): merge reused, quantize kept.
    _kill_at(argv, env, tmp_path / "2.log", "export_onnx: ", delay=2.0)
    assert "stage merge_adapter: cached" in (tmp_path / "2.log").read_text()
    assert "stage export_onnx: done" not in (tmp_path / "2.log").read_text()
    assert not out.exists()
    assert _complete_entries(cache) == {"merge_adapter", "quantize"}

    # 3. The rerun completes, reusing both.
    start = time.monotonic()
    done = run_build(argv, env, tmp_path / "3.log")
    cold_rest = time.monotonic() - start
    text = (tmp_path / "3.log").read_text()
    assert done.returncode == 0, text[-3000:]
    assert "stage merge_adapter: cached" in text
    assert "stage quantize: cached" in text
    assert verify_manifest(out) == []
    first_manifest = (out / "manifest.json").read_bytes()

    # 4. During packaging, over the complete package: it stays (or --out is absent, never partial).
    _kill_at(argv, env, tmp_path / "4.log", "stage package: start", delay=0.0)
    assert "stage package: done" not in (tmp_path / "4.log").read_text()
    if out.exists():
        assert verify_manifest(out) == []
        assert (out / "manifest.json").read_bytes() == first_manifest
    assert _complete_entries(cache) == {"merge_adapter", "quantize", "export_onnx", "verify"}

    # 5. A rerun with every stage cached: complete, identical, much faster than step 3.
    start = time.monotonic()
    done = run_build(argv, env, tmp_path / "5.log")
    warm = time.monotonic() - start
    text = (tmp_path / "5.log").read_text()
    assert done.returncode == 0, text[-3000:]
    for stage in ("merge_adapter", "quantize", "export_onnx", "verify"):
        assert f"stage {stage}: cached" in text, stage
    assert (out / "manifest.json").read_bytes() == first_manifest
    assert warm < cold_rest, (warm, cold_rest)
