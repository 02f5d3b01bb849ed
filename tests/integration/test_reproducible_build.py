"""Two builds of the same inputs give identical manifests and files; so does a warm-cache build.

Build A runs without the stage cache, build B fills an empty cache, build C reuses every cached
stage. All three packages must hash the same, except the files their manifest names as
``nondeterministic`` (measurements of the run), and their archives must be byte-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_build import build_argv, build_env, make_inputs, run_build

from rslora_deploy.stages.package import package_files, verify_manifest

pytestmark = pytest.mark.slow


def _hashes(package: Path) -> dict[str, str]:
    from rslora_deploy._fsutil import sha256_file

    return {rel: sha256_file(package / rel) for rel in package_files(package)[0]}


def test_tiny_builds_are_byte_identical(tmp_path: Path) -> None:
    base, adapter, recipe = make_inputs(tmp_path / "inputs")
    env = build_env(tmp_path / "stage-cache")
    packages = {}
    for name, flags in (("a", ["--no-cache"]), ("b", []), ("c", [])):
        out = tmp_path / name / "pkg"
        log = tmp_path / f"{name}.log"
        proc = run_build(build_argv(base, adapter, recipe, out, "--archive", *flags), env, log)
        assert proc.returncode == 0, log.read_text()[-3000:]
        assert verify_manifest(out) == []
        packages[name] = out
    assert "stage quantize: cached" in (tmp_path / "c.log").read_text()
    assert "cached" not in (tmp_path / "b.log").read_text()
    manifests = {n: (p / "manifest.json").read_bytes() for n, p in packages.items()}
    assert manifests["a"] == manifests["b"] == manifests["c"]
    manifest = json.loads(manifests["a"])
    named = {entry["path"] for entry in manifest["nondeterministic"]}
    assert "reports/build.json" in named  # (other stages may name their own measurements)
    hashes = {n: _hashes(p) for n, p in packages.items()}
    for rel in hashes["a"]:
        if rel not in named:
            assert hashes["a"][rel] == hashes["b"][rel] == hashes["c"][rel], rel
    assert "created_utc" not in manifest
    assert "out" not in manifest["config"]
    assert manifest["tool"]["libraries"]["onnxruntime-genai"]
    # Archives hold the hashed files only: the same bytes for all three builds.
    archives = {(p.parent / "pkg.tar.gz").read_bytes() for p in packages.values()}
    assert len(archives) == 1
