"""Stage cache: reuse, atomic entries, a lock per key, and survival of SIGKILL mid-write."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rslora_deploy.stages.cache import StageCache, stage_key

# A child process that produces one entry slowly: it appends to a log when produce starts, then
# writes two files over `delay` seconds.
_CHILD = """
import sys, time
from pathlib import Path
from rslora_deploy.stages.cache import StageCache
root, key, log, delay = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
def produce(out):
    with log.open("a") as f:
        f.write("produce\\n")
    out.mkdir()
    (out / "a.bin").write_bytes(b"a" * 1000)
    time.sleep(delay)
    (out / "b.bin").write_bytes(b"b" * 1000)
    return {"n": 2}
result = StageCache(root).run("quantize", key, produce, Path("unused"))
print("hit" if result.hit else "miss", flush=True)
"""


def _child(root: Path, key: str, log: Path, delay: float) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    argv = [sys.executable, "-c", _CHILD, str(root), key, str(log), str(delay)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)


def _produce_files(calls: list[int]):
    def produce(out: Path) -> dict:
        calls.append(1)
        out.mkdir()
        (out / "w.bin").write_bytes(b"x" * 10)
        return {"method": "rtn"}

    return produce


def test_key_depends_on_inputs_and_is_stable() -> None:
    a = stage_key("quantize", {"upstream": "k1", "bits": 4})
    assert a == stage_key("quantize", {"bits": 4, "upstream": "k1"})
    assert a != stage_key("quantize", {"upstream": "k1", "bits": 8})
    assert a != stage_key("export", {"upstream": "k1", "bits": 4})


def test_second_run_reuses_the_entry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache, calls = StageCache(tmp_path / "c"), []
    first = cache.run("quantize", "k" * 64, _produce_files(calls), tmp_path / "unused")
    with caplog.at_level(logging.INFO, logger="rslora_deploy.stages.cache"):
        second = cache.run("quantize", "k" * 64, _produce_files(calls), tmp_path / "unused")
    assert calls == [1]
    assert (first.hit, second.hit) == (False, True)
    assert second.path == first.path
    assert (second.path / "w.bin").read_bytes() == b"x" * 10
    assert second.meta == {"method": "rtn"}
    assert "stage quantize: cached" in caplog.text
    assert [(e.stage, e.key) for e in cache.entries()] == [("quantize", "k" * 64)]
    assert cache.clear() == 1
    assert cache.entries() == []


def test_disabled_cache_writes_to_the_callers_dir(tmp_path: Path) -> None:
    result = StageCache(tmp_path / "c", enabled=False).run(
        "merge", "k", _produce_files([]), tmp_path / "work" / "merged"
    )
    assert result.path == tmp_path / "work" / "merged"
    assert (result.path / "w.bin").is_file()
    assert not (tmp_path / "c").exists()


def test_failed_stage_leaves_no_entry(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "c")

    def fail(out: Path) -> dict:
        out.mkdir()
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.run("export", "k", fail, tmp_path)
    assert cache.entries() == []
    assert [p.name for p in (tmp_path / "c" / "export").iterdir()] == ["k.lock"]


def test_damaged_entry_is_recomputed(tmp_path: Path) -> None:
    cache, calls = StageCache(tmp_path / "c"), []
    first = cache.run("quantize", "k", _produce_files(calls), tmp_path)
    (first.path / "w.bin").write_bytes(b"x")  # truncated behind the cache's back
    again = cache.run("quantize", "k", _produce_files(calls), tmp_path)
    assert (again.hit, len(calls)) == (False, 2)
    assert (again.path / "w.bin").read_bytes() == b"x" * 10


def test_sigkill_mid_write_leaves_no_entry_and_next_run_completes(tmp_path: Path) -> None:
    root, log = tmp_path / "c", tmp_path / "log"
    proc = _child(root, "k", log, delay=30)
    deadline = time.time() + 60
    while not log.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert log.exists(), "the child never started producing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert StageCache(root).entries() == []
    assert list((root / "quantize").glob(".tmp-k-*"))  # the dead writer's leftovers
    rerun = _child(root, "k", log, delay=0)
    assert rerun.communicate(timeout=120)[0].strip() == "miss"
    assert not list((root / "quantize").glob(".tmp-k-*"))
    entry = json.loads((root / "quantize" / "k" / "entry.json").read_text())
    assert entry["files"] == {"a.bin": 1000, "b.bin": 1000}


def test_concurrent_builds_share_one_entry(tmp_path: Path) -> None:
    root, log = tmp_path / "c", tmp_path / "log"
    procs = [_child(root, "k", log, delay=2) for _ in range(2)]
    outputs = sorted(p.communicate(timeout=180)[0].strip() for p in procs)
    assert outputs == ["hit", "miss"]
    assert log.read_text().count("produce") == 1


def test_cache_cli_ls_and_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rslora_deploy.cli.app import main

    monkeypatch.setenv("RSLORA_DEPLOY_CACHE", str(tmp_path))
    StageCache().run("merge", "m" * 64, _produce_files([]), tmp_path)
    assert main(["cache", "ls", "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(e["stage"], e["key"]) for e in listed["entries"]] == [("merge", "m" * 64)]
    assert main(["cache", "clear"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert StageCache().entries() == []
