"""File-system helpers shared by the whole package: hashing, staged (atomic) output, JSON files.

One home for what used to be written out by hand in several modules, so every file hash is the
same SHA-256 over the same bytes, every output directory appears whole or not at all, and every
JSON report is written the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from rslora_deploy.errors import ConfigError

#: Read size for hashing: large enough that Python overhead is negligible, small enough to stream
#: a multi-GB ``model.onnx.data`` without holding it.
HASH_CHUNK = 1 << 22


def sha256_file(path: Path, chunk: int = HASH_CHUNK) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk``-byte blocks (4 MiB by default).

    Args:
        path: the file.
        chunk: bytes read per block.

    Returns:
        The lowercase hex digest.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: Any, *, indent: int = 2) -> None:
    """Write ``data`` as UTF-8 JSON with a trailing newline (non-JSON values via ``str``).

    Args:
        path: the file to (over)write.
        data: JSON-able data; other values (paths, enums) are written as their ``str``.
        indent: JSON indentation.
    """
    Path(path).write_text(json.dumps(data, indent=indent, default=str) + "\n", encoding="utf-8")


def chmod_like_mkdir(path: Path) -> None:
    """Give ``path`` the permissions a plain ``mkdir`` would (``0o777 & ~umask``).

    ``tempfile.mkdtemp`` creates 0700 directories; a staged directory renamed into place would
    otherwise keep that mode.
    """
    umask = os.umask(0)
    os.umask(umask)
    Path(path).chmod(0o777 & ~umask)


@contextmanager
def staged_output(
    target: Path, overwrite: bool, hint: str = "pass --overwrite or choose another --out"
) -> Iterator[Path]:
    """Yield a staging directory beside ``target``; on success rename it to ``target``.

    On any exception the staging directory (and any parent directories this call created) are
    removed, so nothing is left at or beside the output path. With ``overwrite`` an existing
    ``target`` is replaced only once the new one is complete.

    Args:
        target: the final directory.
        overwrite: replace an existing non-empty ``target``.
        hint: the "what to do" part of the error when ``target`` exists.

    Yields:
        The staging directory (``.<name>.partial-XXXX`` beside ``target``).

    Raises:
        ConfigError: ``target`` exists, is not an empty directory, and ``overwrite`` is False.
    """
    target = Path(target).absolute()
    empty_dir = target.is_dir() and not any(target.iterdir())
    if target.exists() and not empty_dir and not overwrite:
        raise ConfigError(f"output path {target} already exists and is not empty; {hint}")
    created = []
    parent = target.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    chmod_like_mkdir(staging)
    try:
        yield staging
        _replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in created:
            shutil.rmtree(directory, ignore_errors=True)
        raise


def _replace(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, moving an existing ``target`` aside first."""
    if not target.exists():
        staging.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{staging.name[-8:]}")
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def atomic_new_dir(out: Path) -> AbstractContextManager[Path]:
    """:func:`staged_output` for commands without ``--overwrite``: ``out`` must be new or empty."""
    return staged_output(out, overwrite=False, hint="choose a new --out or delete it")
