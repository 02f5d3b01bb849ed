"""Hostile packages and archives: ``verify`` and ``package --archive`` refuse each, naming it."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rslora_deploy.archive import extract_archive, write_archive
from rslora_deploy.cli.app import main
from rslora_deploy.errors import InputError
from tests.unit.cli.clean_failure import assert_clean_failure

MakePackage = Callable[..., Path]


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "/etc/passwd"
    return info, data


def _write_tar(path: Path, members: list[tuple]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _package_members(root: Path) -> list[tuple]:
    """The members of an intact package, as (TarInfo, bytes), manifest first."""
    paths = [root / "manifest.json", *sorted(p for p in root.rglob("*") if p.is_file())]
    seen, out = set(), []
    for path in paths:
        rel = path.relative_to(root).as_posix()
        if rel not in seen:
            seen.add(rel)
            out.append(_member(rel, path.read_bytes()))
    return out


def _verify(archive: Path) -> list[str]:
    return ["verify", str(archive), "--no-generate"]


# --- the archive itself ------------------------------------------------------------------------


def test_archive_bytes_depend_only_on_content(fake_package: MakePackage, tmp_path: Path) -> None:
    first = write_archive(fake_package("a"), tmp_path / "a.tar.gz")
    time.sleep(1.1)  # a different wall clock, directory name and file mtimes
    second_dir = fake_package("b")
    for path in second_dir.rglob("*"):
        os.utime(path, (12345, 12345))
    second = write_archive(second_dir, tmp_path / "b.tgz")
    assert first.read_bytes() == second.read_bytes()
    raw = first.read_bytes()
    assert raw[4:8] == b"\0\0\0\0"  # gzip MTIME
    assert not raw[3] & 0x08  # no FNAME field
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    assert [m.name for m in members][0] == "manifest.json"
    assert [m.name for m in members][1:] == sorted(m.name for m in members[1:])
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "", "", 0o644)
    }


def test_archive_roundtrip_verifies(
    fake_package: MakePackage, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    package = fake_package()
    assert main(["package", "--archive", str(package), "--format", "json"]) == 0
    archive = tmp_path / "pkg.tar.gz"
    assert json.loads(capsys.readouterr().out)["archive"] == str(archive)
    assert main(_verify(archive)) == 0
    assert "manifest ok" in capsys.readouterr().out


def test_extract_caps(fake_package: MakePackage, tmp_path: Path) -> None:
    archive = write_archive(fake_package(), tmp_path / "p.tar.gz")
    with pytest.raises(InputError, match="per file"):
        extract_archive(archive, tmp_path / "x", max_member_bytes=100)
    with pytest.raises(InputError, match="expands past"):
        extract_archive(archive, tmp_path / "y", max_total_bytes=520)
    with pytest.raises(InputError, match="more than 2 members"):
        extract_archive(archive, tmp_path / "z", max_members=2)
    assert not any((tmp_path / d).exists() for d in "xyz")


# --- hostile archives: `verify X.tar.gz` exits 1 naming the problem, leaves no extraction ----


def _flip_byte(archive: Path) -> None:
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    archive.write_bytes(bytes(raw))


def _tampered_member(members: list[tuple]) -> list[tuple]:
    out = []
    for info, data in members:
        if info.name == "model/model.onnx":
            data = b"X" + data[1:]
        out.append(_member(info.name, data))
    return out


ARCHIVE_CASES: dict[str, tuple[Callable[[list[tuple]], list[tuple]], tuple[str, ...]]] = {
    "dotdot-member": (lambda m: [*m, _member("../evil.txt", b"x")], ("'../evil.txt'", "..")),
    "nested-dotdot": (lambda m: [*m, _member("model/../../x", b"x")], ("model/../../x",)),
    "absolute-member": (lambda m: [*m, _member("/tmp/evil.txt", b"x")], ("absolute",)),
    "symlink-member": (
        lambda m: [*m, _member("model/link", kind=tarfile.SYMTYPE)],
        ("model/link", "symbolic link"),
    ),
    "hardlink-member": (
        lambda m: [*m, _member("model/hard", kind=tarfile.LNKTYPE)],
        ("hard link",),
    ),
    "char-device-member": (lambda m: [*m, _member("dev", kind=tarfile.CHRTYPE)], ("device",)),
    "block-device-member": (lambda m: [*m, _member("blk", kind=tarfile.BLKTYPE)], ("device",)),
    "fifo-member": (lambda m: [*m, _member("pipe", kind=tarfile.FIFOTYPE)], ("FIFO",)),
    "duplicate-member": (lambda m: [*m, m[-1]], ("appears twice",)),
    "extra-file": (lambda m: [*m, _member("model/extra.bin", b"x")], ("model/extra.bin",)),
    "missing-file": (
        lambda m: [x for x in m if x[0].name != "reports/budget.json"],
        ("reports/budget.json", "missing"),
    ),
    "tampered-file": (_tampered_member, ("model/model.onnx", "content differs")),
    "no-manifest": (lambda m: m[1:], ("manifest.json",)),
}


@pytest.mark.parametrize("case", sorted(ARCHIVE_CASES))
def test_hostile_archive(
    case: str,
    fake_package: MakePackage,
    tmp_path: Path,
    private_tmp: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mutate, needles = ARCHIVE_CASES[case]
    archive = _write_tar(tmp_path / "bad.tar.gz", mutate(_package_members(fake_package())))
    assert_clean_failure(_verify(archive), capsys, tmp_path / "never", *needles)
    assert not (tmp_path / "evil.txt").exists()
    assert list(private_tmp.iterdir()) == []  # the extraction directory is gone


@pytest.mark.parametrize(
    ("case", "needle"),
    [("flipped-byte", "corrupted"), ("truncated", "corrupted"), ("not-gzip", "corrupted")],
)
def test_damaged_archive_bytes(
    case: str,
    needle: str,
    fake_package: MakePackage,
    tmp_path: Path,
    private_tmp: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    archive = write_archive(fake_package(), tmp_path / "p.tar.gz")
    if case == "flipped-byte":
        _flip_byte(archive)
    elif case == "truncated":
        archive.write_bytes(archive.read_bytes()[:-40])
    else:
        archive.write_bytes(gzip.decompress(archive.read_bytes())[:2000])
    assert_clean_failure(_verify(archive), capsys, tmp_path / "never", needle, str(archive))
    assert list(private_tmp.iterdir()) == []


# --- hostile package directories: `verify DIR` and `package --archive DIR` ---------------------


def _edit_manifest(root: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def _rehashed(edit: Callable[[Path], None]) -> Callable[[Path], None]:
    """Apply ``edit`` and rewrite the manifest to match: the package is consistent but hostile."""

    def mutate(root: Path) -> None:
        from rslora_deploy.stages.package import write_manifest

        edit(root)
        write_manifest(root, {"budget": {}}, created_utc="2026-01-01T00:00:00Z")

    return mutate


PACKAGE_CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "tampered-file": (
        lambda r: (r / "model" / "model.onnx").write_bytes(b"graph" * 99 + b"grapH"),
        ("model/model.onnx", "content differs"),
    ),
    "truncated-file": (
        lambda r: (r / "model" / "model.onnx").write_bytes(b"graph"),
        ("model/model.onnx",),
    ),
    "extra-file": (lambda r: (r / "model" / "x.bin").write_bytes(b"1"), ("model/x.bin",)),
    "missing-file": (
        lambda r: (r / "reports" / "budget.json").unlink(),
        ("reports/budget.json", "missing"),
    ),
    "manifest-lists-missing": (
        lambda r: _edit_manifest(
            r, lambda m: m["files"].append({**m["files"][0], "path": "model/gone.onnx"})
        ),
        ("model/gone.onnx", "missing"),
    ),
    "manifest-dotdot-path": (
        lambda r: _edit_manifest(r, lambda m: m["files"][0].update(path="../../etc/passwd")),
        ("../../etc/passwd", "outside"),
    ),
    "manifest-absolute-path": (
        lambda r: _edit_manifest(r, lambda m: m["files"][0].update(path="/etc/passwd")),
        ("/etc/passwd", "outside"),
    ),
    "manifest-not-json": (
        lambda r: (r / "manifest.json").write_text("{files: oops"),
        ("manifest.json", "not valid JSON"),
    ),
    "manifest-is-a-list": (
        lambda r: (r / "manifest.json").write_text("[]"),
        ("manifest.json", "expected an object"),
    ),
    "manifest-files-not-list": (
        lambda r: _edit_manifest(r, lambda m: m.update(files={"a": 1})),
        ("'files' list",),
    ),
    "manifest-bad-sha": (
        lambda r: _edit_manifest(r, lambda m: m["files"][0].update(sha256="zz")),
        ("malformed file entry",),
    ),
    "manifest-too-large": (
        lambda r: (r / "manifest.json").write_bytes(b" " * (17 * 2**20) + b"{}"),
        ("manifest.json", "limit"),
    ),
    "symlink-in-package": (
        lambda r: (r / "model" / "link").symlink_to("/etc/passwd"),
        ("model/link", "symbolic link"),
    ),
    "runtime-config-escapes": (
        _rehashed(
            lambda r: (r / "model" / "genai_config.json").write_text(
                '{"model": {"decoder": {"filename": "../../../etc/passwd"}}}'
            )
        ),
        ("genai_config.json", "../../../etc/passwd", "outside"),
    ),
    "fifo-in-package": (
        lambda r: os.mkfifo(r / "model" / "pipe"),
        ("model/pipe", "not a regular file"),
    ),
}


@pytest.mark.parametrize("case", sorted(PACKAGE_CASES))
@pytest.mark.parametrize("command", ["verify", "archive"])
def test_hostile_package(
    case: str,
    command: str,
    fake_package: MakePackage,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mutate, needles = PACKAGE_CASES[case]
    package = fake_package()
    mutate(package)
    archive = tmp_path / "pkg.tar.gz"
    if command == "verify":
        argv = ["verify", str(package), "--no-generate"]
    else:
        argv = ["package", "--archive", str(package), "--out", str(archive)]
    assert_clean_failure(argv, capsys, archive, *needles)
