"""Stage cache: each stage's output stored under the hash of everything that decides it.

Layout under :func:`cache_root` (``$RSLORA_DEPLOY_STAGE_CACHE``, ``$RSLORA_DEPLOY_CACHE/stages``
or ``~/.cache/rslora-deploy/stages``)::

    <stage>/<key>/output/       the stage's files, exactly as the stage wrote them
    <stage>/<key>/entry.json    stage, key, the stage's meta, file sizes
    <stage>/<key>.lock          fcntl lock file of that key
    <stage>/.tmp-<key>-XXXX/    an entry being written (removed when its writer fails or dies)

The key is SHA-256 over canonical JSON of the stage name, its inputs (input file hashes or the
keys of the stages it reads, its own settings) and the tool and key library versions
(:func:`rslora_deploy.provenance.tool_record`) and a digest of this package's own source
(:func:`code_digest`). An entry is written under a temporary name and
renamed into place only when complete, so a build killed at any moment (SIGKILL included) leaves
either a complete entry or none; a leftover temporary directory is removed by the next writer of
that key. Writers of one key are serialized by an exclusive ``fcntl.flock`` on its lock file:
two builds that need the same stage at once compute it once, and the second reuses it.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rslora_deploy._fsutil import write_json

logger = logging.getLogger(__name__)

ENTRY = "entry.json"
OUTPUT = "output"
_TMP = ".tmp-"


def cache_root() -> Path:
    """The stage cache's folder.

    ``$RSLORA_DEPLOY_STAGE_CACHE``, else ``$RSLORA_DEPLOY_CACHE/stages``, else
    ``~/.cache/rslora-deploy/stages``.
    """
    override = os.environ.get("RSLORA_DEPLOY_STAGE_CACHE")
    if override:
        return Path(override)
    from rslora_deploy.data.assets import cache_dir

    return cache_dir() / "stages"


@functools.cache
def code_digest() -> str:
    """sha256 over this package's Python sources (path and bytes of every ``*.py``).

    Part of every key: the version number does not change while the code is developed, and a
    stage whose code changed must not be served from an entry the old code wrote.
    """
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CachedOutput:
    """Where a stage's output is, what the stage said about it, and whether it was reused."""

    path: Path
    meta: dict[str, Any]
    hit: bool


@dataclass(frozen=True)
class EntryInfo:
    """One complete cache entry, for ``rslora-deploy cache ls``."""

    stage: str
    key: str
    bytes: int
    created: float
    path: Path


def stage_key(stage: str, inputs: Mapping[str, Any]) -> str:
    """SHA-256 of the stage, its inputs and the tool/library versions (canonical JSON).

    Args:
        stage: the stage name.
        inputs: JSON-able description of everything else that decides the output: input file
            hashes or upstream keys, and the stage's settings. Paths of outputs do not belong here.
    """
    from rslora_deploy.provenance import tool_record

    payload = {"stage": stage, "inputs": inputs, "tool": tool_record(), "code": code_digest()}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class StageCache:
    """Reuse of stage outputs across builds (see the module docstring).

    Args:
        root: the cache directory (default :func:`cache_root`).
        enabled: False (``--no-cache``) runs every stage into the caller's directory, reading and
            writing nothing here.
    """

    def __init__(self, root: Path | None = None, *, enabled: bool = True) -> None:
        self.root = Path(root) if root is not None else cache_root()
        self.enabled = enabled

    def run(
        self,
        stage: str,
        key: str,
        produce: Callable[[Path], dict[str, Any]],
        uncached_dir: Path,
    ) -> CachedOutput:
        """The output of ``stage`` for ``key``: reused if complete, else produced and stored.

        Args:
            stage: stage name (a directory level of the cache).
            key: :func:`stage_key` of the stage's inputs.
            produce: writes the stage's files into the directory it is given (which does not
                exist yet) and returns the stage's JSON-able meta.
            uncached_dir: where ``produce`` writes when the cache is disabled.

        Returns:
            The output directory, the meta, and whether it came from the cache.
        """
        if not self.enabled:
            Path(uncached_dir).parent.mkdir(parents=True, exist_ok=True)
            return CachedOutput(Path(uncached_dir), produce(Path(uncached_dir)), hit=False)
        stage_dir = self.root / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        final = stage_dir / key
        with _locked(stage_dir / f"{key}.lock"):
            found = _read_entry(final)
            if found is not None:
                logger.info("stage %s: cached (%s)", stage, key[:12])
                return CachedOutput(final / OUTPUT, found["meta"], hit=True)
            _remove_stale(stage_dir, key)
            meta = self._write(stage, key, produce, stage_dir, final)
        return CachedOutput(final / OUTPUT, meta, hit=False)

    def _write(
        self,
        stage: str,
        key: str,
        produce: Callable[[Path], dict[str, Any]],
        stage_dir: Path,
        final: Path,
    ) -> dict[str, Any]:
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP}{key}-", dir=stage_dir))
        try:
            meta = produce(tmp / OUTPUT)
            files = {
                p.relative_to(tmp / OUTPUT).as_posix(): p.stat().st_size
                for p in sorted((tmp / OUTPUT).rglob("*"))
                if p.is_file()
            }
            entry = {"stage": stage, "key": key, "meta": meta, "files": files}
            write_json(tmp / ENTRY, entry)
            if final.exists():  # an entry that failed its size check: replace it
                shutil.rmtree(final)
            tmp.rename(final)  # the only step that makes an entry visible: atomic
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dict(json.loads((final / ENTRY).read_text())["meta"])

    def entries(self) -> list[EntryInfo]:
        """Every complete entry, oldest first."""
        found: list[EntryInfo] = []
        if not self.root.is_dir():
            return found
        for entry_file in self.root.glob(f"*/*/{ENTRY}"):
            directory = entry_file.parent
            if directory.name.startswith(_TMP):
                continue
            size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
            found.append(
                EntryInfo(
                    directory.parent.name,
                    directory.name,
                    size,
                    entry_file.stat().st_mtime,
                    directory,
                )
            )
        return sorted(found, key=lambda e: e.created)

    def clear(self, stage: str | None = None) -> int:
        """Remove complete entries (of one stage or all), each under its key's lock.

        Returns:
            The number of entries removed.
        """
        removed = 0
        for info in self.entries():
            if stage is not None and info.stage != stage:
                continue
            with _locked(info.path.parent / f"{info.key}.lock"):
                shutil.rmtree(info.path, ignore_errors=True)
                _remove_stale(info.path.parent, info.key)
            (info.path.parent / f"{info.key}.lock").unlink(missing_ok=True)
            removed += 1
        return removed


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``; the kernel drops it if the process dies."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.perf_counter()
        fcntl.flock(fd, fcntl.LOCK_EX)
        waited = time.perf_counter() - start
        if waited > 1:
            logger.info("cache: waited %.0f s for another build holding %s", waited, lock_path.name)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_entry(final: Path) -> dict[str, Any] | None:
    """The entry's record if it is complete and its files have the recorded sizes, else None."""
    try:
        entry: dict[str, Any] = json.loads((final / ENTRY).read_text())
        for rel, size in entry["files"].items():
            if (final / OUTPUT / rel).stat().st_size != size:
                raise ValueError(f"{rel} changed size")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("cache: entry %s is damaged (%s); recomputing it", final, exc)
        return None
    return entry


def _remove_stale(stage_dir: Path, key: str) -> None:
    """Temporary directories of ``key`` left by a writer that died (we hold the key's lock)."""
    for stale in stage_dir.glob(f"{_TMP}{key}-*"):
        logger.info("cache: removing %s left by an interrupted build", stale.name)
        shutil.rmtree(stale, ignore_errors=True)
