"""Reading files that came from somewhere else: size caps, type checks and confined paths.

Every JSON/TOML file the tool reads from a user, a model directory or a package goes through
here, so that a 2 GB ``config.json``, a list where an object belongs, or a manifest naming
``../../etc/passwd`` fails with one line naming the file and the fix, before anything large is
allocated or anything outside the directory is touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

import tomllib

from rslora_deploy.errors import ConfigError, InputError, RsloraDeployError

#: Real config.json / genai_config.json / recipes / profiles are a few KB; manifests list a
#: handful of files. 16 MiB leaves two orders of magnitude for growth and bounds the memory a
#: hostile file can make us use.
MAX_JSON_BYTES = 16 * 2**20
MAX_TOML_BYTES = 1 * 2**20


def read_limited(
    path: Path, max_bytes: int, what: str, error: type[RsloraDeployError] = InputError
) -> bytes:
    """The bytes of ``path``, refusing a file larger than ``max_bytes`` before reading it.

    Raises:
        error: missing or unreadable file, not a regular file, or over the cap.
    """
    path = Path(path)
    try:
        # stat first: opening a FIFO would block, and a device has no meaningful size.
        if path.exists() and not path.is_file() and not path.is_dir():
            raise error(f"{what} {path} is not a regular file; pass a regular file")
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise error(
                    f"{what} {path} is {size} bytes, over the {max_bytes}-byte limit for this "
                    "file; it is not what it claims to be"
                )
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise error(f"cannot read {what} {path}: it does not exist; check the path") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory, not a file; check the path") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}; check the path") from None
    if len(data) > max_bytes:  # grew while we read, or a pipe/device that reported size 0
        raise error(f"{what} {path} is over the {max_bytes}-byte limit; refusing it")
    return data


def read_json(
    path: Path,
    what: str,
    *,
    max_bytes: int = MAX_JSON_BYTES,
    error: type[RsloraDeployError] = InputError,
    fix: str = "re-export it",
) -> dict[str, Any]:
    """Parse ``path`` as a JSON object (size-capped).

    Raises:
        error: unreadable, too large, not UTF-8 JSON, or not a JSON object.
    """
    raw = read_limited(path, max_bytes, what, error)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{what} {path} is not valid JSON ({exc}); {fix}") from None
    except RecursionError:
        raise error(f"{what} {path} nests too deeply to be a real file; {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} holds a JSON {type(data).__name__}, expected an object; {fix}")
    return data


def read_toml(
    path: Path,
    what: str,
    *,
    max_bytes: int = MAX_TOML_BYTES,
    error: type[RsloraDeployError] = ConfigError,
) -> dict[str, Any]:
    """Parse ``path`` as TOML (size-capped).

    Raises:
        error: unreadable, too large, not UTF-8 or not valid TOML.
    """
    raw = read_limited(path, max_bytes, what, error)
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise error(f"{what} {path} is not valid TOML: {exc}") from None


def confined(root: Path, rel: object, what: str) -> Path:
    """``root / rel`` for a relative POSIX path that stays inside ``root``.

    Raises:
        InputError: ``rel`` is not a string, is absolute, holds ``..`` or a NUL, or resolves
            (through a symlink) outside ``root``.
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise InputError(f"{what} names an invalid path {rel!r}; the file is malformed")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts:
        raise InputError(
            f"{what} names {rel!r}, outside its directory; refusing it (paths must be relative, "
            "without '..')"
        )
    path = Path(root) / pure
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise InputError(f"{what} names {rel!r}, which leads outside {root} through a link")
    return path
