"""Stage ``package``: manifest, model card and atomic placement of the finished package.

Package contract (docs/package.md; other tools rely on it):

    <out>/manifest.json   schema_version, tool, profile, inputs (+sha256), quantization, export,
                          budget {fits, budget_bytes, estimate_bytes}, files [{path, bytes, sha256}]
    <out>/model/          model.onnx, model.onnx.data, genai_config.json, tokenizer files
    <out>/reports/        budget.json, build.json, and merge_report.json / quality.json when run
    <out>/README.md       model card

The whole package is assembled in a hidden staging directory beside ``<out>`` and renamed into place
only when complete, so an interrupted or failed build never leaves half a package at ``<out>``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rslora_deploy._fsutil import chmod_like_mkdir, sha256_file
from rslora_deploy.errors import ConfigError, InputError

MANIFEST = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


def file_entries(root: Path) -> list[dict[str, Any]]:
    """``{path, bytes, sha256}`` for every file under ``root`` except the manifest, sorted.

    Raises:
        InputError: ``root`` holds a link or special file (a package holds regular files only).
    """
    files, problems = package_files(root)
    if problems:
        raise InputError(f"cannot package {root}: {problems[0]}")
    return [
        {"path": rel, "bytes": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
        for rel in files
        if rel != MANIFEST
    ]


def manifest_header(created_utc: str | None = None) -> dict[str, Any]:
    """The fields every manifest starts with: schema version, tool and library versions.

    ``created_utc`` is recorded only when given or when ``SOURCE_DATE_EPOCH`` is set: a clock
    reading would make every build's manifest and model card differ (docs/reproducibility.md).
    """
    from rslora_deploy.provenance import source_date, tool_record

    header: dict[str, Any] = {"schema_version": MANIFEST_SCHEMA_VERSION, "tool": tool_record()}
    stamp = created_utc or source_date()
    if stamp:
        header["created_utc"] = stamp
    return header


def write_manifest(
    root: Path,
    body: dict[str, Any],
    created_utc: str | None = None,
    nondeterministic: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json`` with the tool header and the file list; returns it.

    Args:
        root: the package directory.
        body: the build's settings, inputs and results.
        created_utc: a creation time to record (default: ``SOURCE_DATE_EPOCH`` or none).
        nondeterministic: ``{path, why}`` of files that differ between identical builds by nature
            (measurements of the run); present ones are listed there, not hashed in ``files``.
    """
    named = [dict(e) for e in nondeterministic or [] if (Path(root) / e["path"]).is_file()]
    skipped = {entry["path"] for entry in named}
    files = [entry for entry in file_entries(root) if entry["path"] not in skipped]
    manifest = {
        **manifest_header(created_utc),
        **body,
        "nondeterministic": named,
        "files": files,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(root: Path) -> dict[str, Any]:
    """Read and validate ``root/manifest.json`` (size-capped; every file entry checked).

    Raises:
        InputError: missing, too large, not JSON, or a ``files`` entry that is malformed, names a
            path outside the package (absolute, ``..``) or is listed twice.
    """
    from rslora_deploy.untrusted import confined, read_json

    where = f"manifest of package {root}"
    manifest = read_json(Path(root) / MANIFEST, "package manifest", fix="rebuild the package")
    files = manifest.get("files")
    if not isinstance(files, list):
        raise InputError(f"{where} has no 'files' list; rebuild the package")
    seen: set[str] = set()
    for entry in files:
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("bytes"), int)
            and entry["bytes"] >= 0
            and isinstance(entry.get("sha256"), str)
            and _SHA256.fullmatch(entry["sha256"]) is not None
        )
        if not ok:
            raise InputError(f"{where} has a malformed file entry {str(entry)[:120]}")
        confined(root, entry.get("path"), where)
        if entry["path"] in seen or entry["path"] == MANIFEST:
            raise InputError(f"{where} lists {entry['path']!r} twice; rebuild the package")
        seen.add(entry["path"])
    named = manifest.setdefault("nondeterministic", [])
    if not isinstance(named, list):
        raise InputError(f"{where} has a 'nondeterministic' that is not a list; rebuild it")
    for entry in named:
        if not isinstance(entry, dict) or not isinstance(entry.get("why"), str):
            raise InputError(f"{where} has a malformed nondeterministic entry {str(entry)[:120]}")
        confined(root, entry.get("path"), where)
        if entry["path"] in seen or entry["path"] == MANIFEST:
            raise InputError(f"{where} lists {entry['path']!r} twice; rebuild the package")
        seen.add(entry["path"])
    return manifest


def package_files(root: Path) -> tuple[list[str], list[str]]:
    """``(regular files, problems)`` under ``root``, without following links.

    Problems are links, devices, FIFOs and sockets: a package holds regular files only.
    """
    files, problems = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                problems.append(f"{rel}: is a symbolic link (a package holds regular files only)")
            elif stat.S_ISREG(mode):
                files.append(rel)
            elif not stat.S_ISDIR(mode):
                problems.append(f"{rel}: is not a regular file (device, FIFO or socket)")
    return sorted(files), problems


def verify_manifest(root: Path) -> list[str]:
    """Problems found re-hashing a package against its manifest (empty list: intact).

    The package's files must be exactly the manifest's list plus ``manifest.json``: a missing,
    changed, extra or linked file is a problem, named by its path.

    Raises:
        InputError: the manifest itself is missing or malformed (see :func:`read_manifest`).
    """
    root = Path(root)
    manifest = read_manifest(root)
    present, problems = package_files(root)
    present_set = set(present)
    listed = {entry["path"] for entry in manifest["files"] + manifest["nondeterministic"]}
    for entry in manifest["nondeterministic"]:
        if entry["path"] not in present_set and not (root / entry["path"]).is_symlink():
            problems.append(f"{entry['path']}: missing")
    for entry in manifest["files"]:
        path = root / entry["path"]
        if entry["path"] not in present_set:
            if not path.is_symlink():
                problems.append(f"{entry['path']}: missing")
        elif path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']}: content differs from manifest")
    for rel in present:
        if rel != MANIFEST and rel not in listed:
            problems.append(f"{rel}: not listed in manifest")
    return problems


def check_model_paths(root: Path) -> None:
    """Every file name in ``model/genai_config.json`` stays inside ``model/``.

    The runtime opens what that file names; a package that travelled must not make it read
    ``../../somewhere``.

    Raises:
        InputError: the config is malformed, or a ``filename`` leaves the model folder.
    """
    from rslora_deploy.untrusted import confined, read_json

    config_path = Path(root) / "model" / "genai_config.json"
    if not config_path.is_file():
        return
    where = f"{config_path}"
    pending: list[Any] = [read_json(config_path, "runtime config", fix="rebuild the package")]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "filename" and isinstance(value, str):
                    confined(config_path.parent, value, where)
                else:
                    pending.append(value)
        elif isinstance(node, list):
            pending.extend(node)


def write_model_card(root: Path, manifest: dict[str, Any]) -> None:
    """A short README.md for the package, generated from the manifest and reports."""
    budget = manifest["budget"]
    quant = manifest.get("quantization", {})
    lines = [
        f"# {manifest['inputs']['base'].get('name', 'model')} for {manifest['profile']['name']}",
        "",
        f"Built by rslora-deploy {manifest['tool']['version']}"
        + (f" on {manifest['created_utc']}." if manifest.get("created_utc") else "."),
        "",
        "| item | value |",
        "|---|---|",
        f"| base | {manifest['inputs']['base'].get('name')} |",
        f"| adapter | {(manifest['inputs'].get('adapter') or {}).get('format', 'none')} |",
        f"| quantization | {quant.get('method')} {quant.get('bits')}-bit, "
        f"group {quant.get('group_size')}, sym={quant.get('sym')} |",
        f"| runtime | {manifest['profile']['runtime']} ({manifest['profile']['execution_provider']}"
        f" EP) |",
        f"| memory estimate | {budget['estimate_bytes'] / 2**20:.1f} MiB of "
        f"{budget['budget_bytes'] / 2**20:.0f} MiB: "
        f"{'fits' if budget['fits'] else 'DOES NOT FIT'} |",
    ]
    protection = quant.get("protection")
    shipped = (manifest.get("export") or {}).get("protected_8bit")
    if protection and shipped:
        # The package's own growth: 8-bit MatMulNBits, or exact fp32 MatMul on CPU targets.
        extra = (shipped["bytes_after"] - shipped["bytes_before"]) / 2**20
        lines.append(
            f"| --protect-adapter | {protection['modules']} modules at 8 bits, shipped as "
            f"{shipped['layout']} (+{extra:.1f} MiB) |"
        )
    quality = manifest.get("quality") or {}
    for key, value in quality.items():
        lines.append(f"| {key} | {value} |")
    smoke = manifest.get("smoke_test") or {}
    if smoke:
        lines += ["", "Greedy sample on CPU:", "", "```", smoke.get("text", ""), "```"]
    lines += [
        "",
        "Load it with onnxruntime-genai:",
        "",
        "```python",
        "import onnxruntime_genai as og",
        "model = og.Model('model')",
        "tokenizer = og.Tokenizer(model)",
        "params = og.GeneratorParams(model)",
        "params.set_search_options(do_sample=False, max_length=64)",
        "generator = og.Generator(model, params)",
        "generator.append_tokens(tokenizer.encode('The capital of France is'))",
        "while not generator.is_done():",
        "    generator.generate_next_token()",
        "print(tokenizer.decode(generator.get_sequence(0)))",
        "```",
        "",
        "Every file's sha256 is in manifest.json; `rslora-deploy verify <dir>` re-checks them.",
        "",
    ]
    (root / "README.md").write_text("\n".join(lines))


@contextmanager
def staged_output(
    target: Path, overwrite: bool, hint: str = "pass --overwrite or choose another --out"
) -> Iterator[Path]:
    """Yield a staging directory beside ``target``; on success rename it to ``target``.

    On any exception the staging directory (and any parent directories this call created) are
    removed, so nothing is left at or beside the output path.

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
        if target.exists():
            old = target.with_name(f".{target.name}.old-{staging.name[-8:]}")
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in created:
            shutil.rmtree(directory, ignore_errors=True)
        raise
