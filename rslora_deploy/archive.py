"""One-file packages: a ``.tar.gz`` whose bytes depend only on the content, and its extraction.

Writing (:func:`write_archive`): the members are ``manifest.json`` and every file the manifest
hashes, in sorted path order, at the archive root (no top-level folder, so the bytes do not
depend on the package's directory name; extract with ``tar xzf PKG.tar.gz -C DIR``). Files the
manifest names as ``nondeterministic`` (the build run's own measurements) stay out, so two builds
of the same inputs give the same archive. Every member is a regular file with mtime 0, uid/gid 0,
no user or group name and mode 0644; the gzip header has mtime 0 and no file name. The same
content therefore gives the same archive bytes on any machine with the same zlib
(docs/reproducibility.md).

Reading (:func:`extract_archive`) treats the archive as hostile: members are streamed one at a
time and each is checked before a byte is written. Refused: absolute names, ``..`` components,
duplicate names, anything but regular files and directories (symlinks, hard links, devices,
FIFOs), a member over ``max_member_bytes``, a total over ``max_total_bytes`` and more than
``max_members`` members. A refused archive leaves nothing behind.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

from rslora_deploy.errors import InputError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
#: Caps on what an archive may expand to. The demo package is ~250 MB; a 1.5 B-parameter int4
#: model with an fp32 lm_head stays under 8 GiB.
MAX_TOTAL_BYTES = 16 * 2**30
MAX_MEMBER_BYTES = 8 * 2**30
MAX_MEMBERS = 10_000
_COPY_CHUNK = 1 << 20


def is_archive(path: Path) -> bool:
    """Whether ``path`` names a package archive (by suffix) rather than a package directory."""
    return str(path).endswith(ARCHIVE_SUFFIXES)


def default_archive_path(package_dir: Path) -> Path:
    """``<package_dir>.tar.gz``, beside the package directory."""
    package_dir = Path(package_dir).absolute()
    return package_dir.with_name(package_dir.name + ".tar.gz")


def write_archive(package_dir: Path, archive: Path | None = None) -> Path:
    """Write ``package_dir`` as a reproducible ``.tar.gz``; returns the archive path.

    The package is re-hashed against its manifest first: an archive is only ever made of an intact
    package. The archive is written to a temporary name beside ``archive`` and renamed when
    complete, so an interrupted call leaves no partial archive.

    Raises:
        InputError: ``package_dir`` is not an intact package, or ``archive`` has the wrong suffix.
    """
    from rslora_deploy.stages.package import (
        MANIFEST,
        check_model_paths,
        read_manifest,
        verify_manifest,
    )

    package_dir = Path(package_dir)
    archive = Path(archive) if archive is not None else default_archive_path(package_dir)
    if not is_archive(archive):
        raise InputError(f"archive name {archive} must end with .tar.gz or .tgz; rename it")
    problems = verify_manifest(package_dir)
    if problems:
        raise InputError(
            f"package {package_dir} fails its manifest ({'; '.join(problems[:3])}); "
            "rebuild it before archiving"
        )
    check_model_paths(package_dir)
    names = [MANIFEST, *sorted(entry["path"] for entry in read_manifest(package_dir)["files"])]
    archive.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{archive.name}.partial-", dir=archive.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            _write_members(raw, package_dir, names)
        Path(tmp_name).chmod(0o666 & ~_umask())
        Path(tmp_name).replace(archive)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return archive


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_members(raw: io.BufferedWriter, root: Path, names: list[str]) -> None:
    # filename="" keeps the FNAME field out of the gzip header; mtime=0 fixes MTIME.
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in names:
            path = root / name
            info = tarfile.TarInfo(name)
            info.size = path.stat().st_size
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            with path.open("rb") as handle:
                tar.addfile(info, handle)


def _check_member(member: tarfile.TarInfo, seen: set[str], archive: Path) -> PurePosixPath:
    """The member's safe relative path, or InputError naming the member and what is wrong."""
    name = member.name
    where = f"archive {archive} member {name!r}"
    kind = _unsafe_kind(member)
    if kind:
        raise InputError(f"{where} is a {kind}; a package archive holds only regular files")
    rel = PurePosixPath(name)
    if rel.is_absolute():
        raise InputError(f"{where} has an absolute path; refusing to extract it")
    if ".." in rel.parts:
        raise InputError(f"{where} climbs out of the archive with '..'; refusing to extract it")
    normal = rel.as_posix()
    if normal in ("", ".") or "\x00" in normal:
        raise InputError(f"{where} has an empty or invalid name; the archive is malformed")
    if normal in seen:
        raise InputError(f"{where} appears twice; the archive is malformed or tampered with")
    seen.add(normal)
    return rel


def _unsafe_kind(member: tarfile.TarInfo) -> str | None:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO"
    if not (member.isreg() or member.isdir()):
        return f"special member (tar type {member.type!r})"
    return None


def extract_archive(
    archive: Path,
    dest: Path,
    *,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_members: int = MAX_MEMBERS,
) -> Path:
    """Extract ``archive`` into the empty or missing directory ``dest`` after checking each member.

    Returns:
        ``dest``.

    Raises:
        InputError: the archive is unreadable or corrupted, or a member is unsafe (names it);
            ``dest`` is then removed again.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise InputError(f"archive {archive} does not exist; pass a .tar.gz written by --archive")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        _extract_members(archive, dest, max_total_bytes, max_member_bytes, max_members)
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise InputError(
            f"archive {archive} is corrupted or not a tar.gz ({type(exc).__name__}: "
            f"{str(exc)[:200]}); re-download or rebuild it"
        ) from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def _extract_members(
    archive: Path, dest: Path, max_total: int, max_member: int, max_members: int
) -> None:
    seen: set[str] = set()
    total = 0
    with tarfile.open(archive, mode="r:gz") as tar:
        for count, member in enumerate(tar, start=1):
            if count > max_members:
                raise InputError(
                    f"archive {archive} has more than {max_members} members; refusing it"
                )
            rel = _check_member(member, seen, archive)
            if member.isdir():
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            if member.size > max_member:
                raise InputError(
                    f"archive {archive} member {member.name!r} is {member.size} bytes, over the "
                    f"{max_member}-byte cap per file; refusing it"
                )
            total += member.size
            if total > max_total:
                raise InputError(
                    f"archive {archive} expands past the {max_total}-byte cap at member "
                    f"{member.name!r}; refusing it"
                )
            _copy_member(tar, member, dest / rel)
        _drain(tar, archive, max_total - total)


def _drain(tar: tarfile.TarFile, archive: Path, budget: int) -> None:
    """Read the gzip stream to its end, so its CRC-32 and length trailer are checked.

    tarfile stops at the end-of-archive blocks; without this a flipped byte in the compressed
    stream could go unnoticed by the reader (the manifest would still catch changed content).
    """
    stream = tar.fileobj
    if stream is None:
        return
    while block := stream.read(_COPY_CHUNK):
        budget -= len(block)
        if budget < 0:
            raise InputError(
                f"archive {archive} has data past its end beyond the size cap; refusing it"
            )


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    source = tar.extractfile(member)
    if source is None:  # only for links and devices, which were refused already
        raise InputError(f"archive member {member.name!r} has no data; the archive is malformed")
    target.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: never write through something already there (a directory member of the same name).
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out, source:
        shutil.copyfileobj(source, out, _COPY_CHUNK)
