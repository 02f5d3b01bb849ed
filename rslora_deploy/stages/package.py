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
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rslora_deploy._fsutil import sha256_file, write_json
from rslora_deploy.artifact import Artifact
from rslora_deploy.config import BuildConfig, PackageConfig
from rslora_deploy.errors import ConfigError, InputError
from rslora_deploy.profiles import DeviceProfile
from rslora_deploy.reports import BudgetReport, QualityReport, SmokeReport

if TYPE_CHECKING:
    from rslora_deploy.stages.base import StageContext, StageRecord

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
    write_json(root / MANIFEST, manifest)
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


def record_files(root: Path, paths: list[Path]) -> None:
    """Add or refresh ``paths`` (files under ``root``) in an existing package's manifest.

    For reports written after the build (``budget --measure``, ``reports/budget.html``): only
    those entries change, so any other file that differs from the manifest still fails
    :func:`verify_manifest`.
    """
    manifest_path = root / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    unhashed = {e["path"] for e in manifest.get("nondeterministic", [])}
    fresh = {p.resolve().relative_to(root.resolve()).as_posix(): p for p in paths}
    fresh = {rel: p for rel, p in fresh.items() if rel not in unhashed}  # named, never hashed
    entries = [e for e in manifest["files"] if e["path"] not in fresh]
    for rel, path in fresh.items():
        entries.append({"path": rel, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    manifest["files"] = sorted(entries, key=lambda e: e["path"])
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


def verify_manifest(root: Path) -> list[str]:
    """Problems found re-hashing a package against its manifest (empty list: intact).

    The package's files must be exactly the manifest's list plus ``manifest.json``: a missing,
    changed, extra or linked file is a problem, named by its path. A file named in
    ``nondeterministic`` (the run's measurements) may be present, unhashed, or absent: archives
    leave it out, so that their bytes are the same for every build of the same inputs.

    Raises:
        InputError: the manifest itself is missing or malformed (see :func:`read_manifest`).
    """
    root = Path(root)
    manifest = read_manifest(root)
    present, problems = package_files(root)
    present_set = set(present)
    listed = {entry["path"] for entry in manifest["files"] + manifest["nondeterministic"]}
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


def write_model_card(root: Path, manifest: dict[str, Any], usage: str) -> None:
    """A short README.md for the package, generated from the manifest and reports.

    ``usage`` is the exporter's own text on running ``model/`` (:meth:`Exporter.usage`).
    """
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
        f"| weights shipped | {(manifest.get('export') or {}).get('precision', 'see export')} |",
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
    lines += ["", usage.rstrip("\n"), ""]
    lines += [
        "Every file's sha256 is in manifest.json; `rslora-deploy verify <dir>` re-checks them.",
        "",
    ]
    (root / "README.md").write_text("\n".join(lines))


def describe_dir(path: Path, name: str | None = None) -> dict[str, Any]:
    """Name, path and per-file sha256 of the weight/config files of a model or adapter dir."""
    files = {
        p.name: sha256_file(p)
        for p in sorted(path.iterdir())
        if p.is_file() and p.suffix in (".json", ".safetensors", ".gguf")
    }
    return {"name": name or path.name, "path": str(path), "sha256": files}


def manifest_body(
    profile: DeviceProfile,
    budget: BudgetReport,
    smoke: SmokeReport,
    inputs: dict[str, Any],
    **sections: Any,
) -> dict[str, Any]:
    """The manifest's content besides its header and file list, in one place.

    ``build`` and the ``package`` command both assemble their manifest here. ``sections`` are the
    optional parts a full build adds (``quantization``, ``export``, ``quality``, ``config``); a
    ``None`` section is left out.
    """
    body: dict[str, Any] = {
        "profile": profile.model_dump(mode="json"),
        "inputs": inputs,
        "budget": {
            "fits": budget.fits,
            "budget_bytes": budget.budget_bytes,
            "estimate_bytes": budget.estimate_bytes,
        },
        "smoke_test": {"prompt": smoke.prompt, "text": smoke.text, "runtime": smoke.runtime},
    }
    body.update({key: value for key, value in sections.items() if value is not None})
    return body


def finish_package(staging: Path, body: dict[str, Any]) -> dict[str, Any]:
    """Model card first (it is one of the files the manifest hashes), then the manifest.

    The run's measurements (:data:`rslora_deploy.provenance.RUN_MEASUREMENTS`) are named in the
    manifest's ``nondeterministic`` list instead of hashed (docs/reproducibility.md).
    """
    from rslora_deploy.exporters import get_exporter
    from rslora_deploy.provenance import RUN_MEASUREMENTS

    header = manifest_header()
    usage = get_exporter(body["profile"]["exporter"]).usage()
    write_model_card(staging, {**header, **body}, usage)
    return write_manifest(
        staging,
        body,
        created_utc=header.get("created_utc"),
        nondeterministic=list(RUN_MEASUREMENTS),
    )


def quality_summary(quality: QualityReport | None, protected: bool = False) -> dict[str, Any]:
    """The headline numbers of ``reports/quality.json`` for the manifest and model card."""
    if quality is None:
        return {}
    summary: dict[str, Any] = {}
    for name, stats in quality.models.items():
        summary[f"perplexity_{name}"] = round(stats["perplexity"], 3)
        if name != "merged" and "greedy_agreement" in stats:
            summary[f"greedy_agreement_{name}"] = round(stats["greedy_agreement"], 4)
    if "onnx_vs_quantized" in quality.relative_logit_error:
        error = quality.relative_logit_error["onnx_vs_quantized"]
        summary["onnx_vs_torch_relative_logit_error"] = round(error, 5)
    survival = quality.survival
    if isinstance(survival, dict) and "retained" in survival:
        summary["adapter_survival_retained"] = round(survival["retained"], 3)
        if survival.get("warning"):
            fix = (
                "raise quantize.protect_ratio (1.0 keeps every adapter module at 8 bits)"
                if protected
                else "rebuild with --protect-adapter"
            )
            summary["adapter_survival_warning"] = f"below {survival.get('threshold')}: {fix}"
    if "scored_tokens" in quality.protocol:
        summary["eval_tokens"] = quality.protocol["scored_tokens"]
    return summary


def build_report(
    records: list[StageRecord],
    config: BuildConfig,
    profile: DeviceProfile,
    budget: BudgetReport | None = None,
) -> dict[str, Any]:
    """``reports/build.json``: what this run measured (stage times, peak RSS, the verify run).

    Measurements vary from run to run, so they live here, a file the manifest names as
    nondeterministic, and not in the hashed budget.json.
    """
    return {
        "profile": profile.name,
        "stages": [
            {"name": r.name, "seconds": r.seconds, "peak_rss_bytes": r.peak_rss_bytes}
            for r in records
        ],
        "measured_cpu": budget.measured_cpu.to_json() if budget and budget.measured_cpu else None,
        "config": config.to_json_dict(),
    }


def content_config(config: BuildConfig) -> dict[str, Any]:
    """The config as the manifest records it, without ``out`` and ``overwrite``.

    Those two say where the package went, not what it is: two builds to different places give the
    same manifest.
    """
    return {k: v for k, v in config.to_json_dict().items() if k not in ("out", "overwrite")}


class PackageStage:
    """Stage ``package``: reports, model card and manifest into the staging directory."""

    name: ClassVar[str] = "package"

    def section(self, config: BuildConfig) -> PackageConfig:
        """The ``[package]`` section."""
        return config.package

    def run(self, artifact: Artifact, cfg: PackageConfig, ctx: StageContext) -> Artifact:
        """Write build.json, drop the work dir, write the model card and the manifest."""
        if ctx.inputs is None or ctx.budget is None or ctx.smoke is None:
            raise ConfigError("package needs the load, verify and check_budget stages first")
        write_json(
            ctx.reports / "build.json",
            build_report(ctx.records, ctx.config, ctx.profile, ctx.budget),
        )
        quantized = ctx.artifacts["quantize"]
        if cfg.keep_quantized_checkpoint and quantized.path.is_relative_to(ctx.work):
            shutil.move(quantized.path, ctx.staging / "quantized")
        elif cfg.keep_quantized_checkpoint and not quantized.meta.get("prequantized"):
            shutil.copytree(quantized.path, ctx.staging / "quantized")  # from the stage cache
        shutil.rmtree(ctx.work)
        finish_package(ctx.staging, self._body(ctx))
        return Artifact("package", ctx.staging)

    @staticmethod
    def _body(ctx: StageContext) -> dict[str, Any]:
        inputs = ctx.inputs
        assert inputs is not None, "the load stage sets ctx.inputs"
        assert ctx.budget is not None, "the check_budget stage sets ctx.budget"
        assert ctx.smoke is not None, "the verify stage sets ctx.smoke"
        merged = ctx.artifacts["merge_adapter"]
        adapter = None
        if inputs.adapter_dir is not None:
            adapter = {**describe_dir(inputs.adapter_dir), **merged.meta.get("adapter", {})}
        base_name = "SmolLM2-135M-Instruct" if inputs.is_default_base else inputs.base.path.name
        base = describe_dir(inputs.base.path, base_name)
        if inputs.base_quantization is not None:  # a bnb 4-bit base, dequantized by stage load
            base["name"] = Path(inputs.base_quantization["source"]).name
            base["dequantized_from"] = inputs.base_quantization
        quantized = ctx.artifacts["quantize"]
        return manifest_body(
            ctx.profile,
            ctx.budget,
            ctx.smoke,
            {"base": base, "adapter": adapter},
            quantization={k: v for k, v in quantized.meta.items() if k != "seconds"},
            export=ctx.artifacts["export_onnx"].meta,
            adapters=ctx.runtime_adapters,
            quality=quality_summary(ctx.quality, ctx.config.quantize.protect_adapter),
            config=content_config(ctx.config),
        )
