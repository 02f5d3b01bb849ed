"""Which stages of a build are cached, under which key, and how a cached output is put back.

:func:`run_cached` wraps one stage run (``api.build`` calls it through ``run_stage``). The
expensive stages, merge_adapter, quantize, export_onnx, verify and evaluate, each have a
:class:`_Policy` here: the inputs that decide the stage's output (the hashes of the files it reads
or the keys of the stages it reads from, and its own settings), how its output goes into a cache
entry, and how an entry is restored into the running build. check_budget and package take
milliseconds and always run.

A key chains the keys of upstream stages, so a changed adapter changes merge's key and through it
every later key. Output paths (``--out``) and ``--overwrite`` are never part of a key.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rslora_deploy._fsutil import sha256_file
from rslora_deploy.artifact import Artifact
from rslora_deploy.stages.cache import StageCache, stage_key

if TYPE_CHECKING:
    from rslora_deploy.stages.base import Stage, StageContext

_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered for this process by (path, size, mtime_ns)."""
    stat = Path(path).stat()
    memo = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _DIGESTS:
        _DIGESTS[memo] = sha256_file(path)
    return _DIGESTS[memo]


def dir_digest(path: Path) -> str:
    """sha256 over the sorted ``relative path, sha256`` lines of every file under ``path``."""
    root = Path(path)
    lines = [
        f"{p.relative_to(root).as_posix()}\t{file_digest(p)}\n"
        for p in sorted(root.rglob("*"))
        if p.is_file()
    ]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


@dataclass
class BuildCache:
    """The cache of one build: the store, and the key each stage ran under so far."""

    store: StageCache
    keys: dict[str, str] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Policy:
    inputs: Callable[[Artifact, StageContext, dict[str, str]], dict[str, Any] | None]
    save: Callable[[Artifact, StageContext, Path], dict[str, Any]]
    restore: Callable[[Path, dict[str, Any], Artifact, StageContext, bool], Artifact]


def run_cached(stage: Stage, artifact: Artifact, ctx: StageContext) -> Artifact:
    """Run ``stage`` on ``artifact``, or restore its output from the cache.

    Falls back to a plain run when the build has no cache (``--no-cache``), the stage has no
    policy, or the policy declines (no adapter to merge, an already-quantized input, eval off).
    """
    cache: BuildCache | None = getattr(ctx, "cache", None)
    policy = _POLICIES.get(stage.name)
    plain = lambda: stage.run(artifact, stage.section(ctx.config), ctx)  # noqa: E731
    if cache is None or not cache.store.enabled or policy is None:
        return plain()
    inputs = policy.inputs(artifact, ctx, cache.keys)
    if inputs is None:
        return plain()
    key = stage_key(stage.name, inputs)
    cache.keys[stage.name] = key
    fresh: dict[str, Artifact] = {}

    def produce(out: Path) -> dict[str, Any]:
        result = plain()
        fresh["result"] = result
        return {"kind": result.kind, "meta": result.meta, **policy.save(result, ctx, out)}

    entry = cache.store.run(stage.name, key, produce, uncached_dir=ctx.work / stage.name)
    if entry.hit:
        cache.hits.append(stage.name)
    return policy.restore(entry.path, entry.meta, artifact, ctx, not entry.hit)


def _as_artifact(path: Path, meta: dict[str, Any]) -> Artifact:
    return Artifact(str(meta["kind"]), path, dict(meta["meta"]))


def _json(model: Any) -> Any:
    return model.model_dump(mode="json") if hasattr(model, "model_dump") else model


# -- merge_adapter: base + adapter -> merged dir (used in place, from the cache) ---------------


def _merge_inputs(artifact: Artifact, ctx: StageContext, keys: dict[str, str]) -> dict | None:
    adapter_dir = ctx.inputs.adapter_dir if ctx.inputs else None
    if adapter_dir is None:
        return None  # the base passes through: nothing to cache
    return {
        "base": dir_digest(artifact.path),
        "adapter": dir_digest(adapter_dir),
        "merge": _json(ctx.config.merge),
        "adapter_options": ctx.config.adapter.model_dump(mode="json", exclude={"path"}),
    }


def _move_into(result: Artifact, ctx: StageContext, out: Path) -> dict[str, Any]:
    shutil.move(str(result.path), str(out))
    return {}


def _merge_restore(
    out: Path, meta: dict[str, Any], artifact: Artifact, ctx: StageContext, fresh: bool
) -> Artifact:
    report = out / "merge_report.json"
    if report.is_file():
        shutil.copy2(report, ctx.reports / "merge_report.json")
    return _as_artifact(out, meta)


# -- quantize: merged dir -> checkpoint (used in place, from the cache) -------------------------


def _quantize_inputs(artifact: Artifact, ctx: StageContext, keys: dict[str, str]) -> dict | None:
    from rslora_deploy.stages.quantize import is_prequantized

    if is_prequantized(artifact.path):
        return None  # passed through unchanged
    cfg = ctx.config.quantize
    calib = cfg.calib_path
    return {
        "upstream": keys.get("merge_adapter") or dir_digest(artifact.path),
        "quantize": cfg.model_dump(mode="json", exclude={"calib_path"}),
        "calib": file_digest(calib) if calib is not None else "brown:calibration",
        "protect_base": dir_digest(ctx.inputs.base.path)
        if cfg.protect_adapter and ctx.inputs
        else None,
        "fused_groups": list(getattr(ctx.exporter, "fused_groups", ())),
    }


def _restore_in_place(
    out: Path, meta: dict[str, Any], artifact: Artifact, ctx: StageContext, fresh: bool
) -> Artifact:
    return _as_artifact(out, meta)


# -- export_onnx: checkpoint -> <package>/model (copied back into the package) -----------------


def _export_inputs(artifact: Artifact, ctx: StageContext, keys: dict[str, str]) -> dict | None:
    return {
        "upstream": keys.get("quantize") or dir_digest(artifact.path),
        "export": _json(ctx.config.export),
        "profile": ctx.profile.model_dump(mode="json"),
    }


def _copy_into(result: Artifact, ctx: StageContext, out: Path) -> dict[str, Any]:
    shutil.copytree(result.path, out)
    return {}


def _export_restore(
    out: Path, meta: dict[str, Any], artifact: Artifact, ctx: StageContext, fresh: bool
) -> Artifact:
    target = ctx.staging / "model"
    if not fresh:
        shutil.copytree(out, target)
    return _as_artifact(target, meta)


# -- verify and evaluate: reports only (the entry holds no files) ------------------------------


def _verify_inputs(artifact: Artifact, ctx: StageContext, keys: dict[str, str]) -> dict | None:
    export = keys.get("export_onnx")
    return {"upstream": export} if export else None


_QUALITY = "quality.json"


def _save_report(attr: str) -> Callable[[Artifact, StageContext, Path], dict[str, Any]]:
    def save(result: Artifact, ctx: StageContext, out: Path) -> dict[str, Any]:
        out.mkdir()
        return {"report": _json(getattr(ctx, attr))}

    return save


def _verify_restore(
    out: Path, meta: dict[str, Any], artifact: Artifact, ctx: StageContext, fresh: bool
) -> Artifact:
    from rslora_deploy.reports import SmokeReport

    ctx.smoke = SmokeReport.model_validate(meta["report"])
    return artifact


def _evaluate_inputs(artifact: Artifact, ctx: StageContext, keys: dict[str, str]) -> dict | None:
    if not ctx.config.eval.enabled or "export_onnx" not in keys or ctx.inputs is None:
        return None
    adapter_dir = ctx.inputs.adapter_dir
    return {
        "base": dir_digest(ctx.inputs.base.path),
        "adapter": dir_digest(adapter_dir) if adapter_dir is not None else None,
        "merge": keys.get("merge_adapter"),
        "quantize": keys.get("quantize"),
        "export": keys["export_onnx"],
        "eval": _json(ctx.config.eval),
        "profile_threshold": ctx.profile.survival_threshold,
    }


def _evaluate_save(result: Artifact, ctx: StageContext, out: Path) -> dict[str, Any]:
    out.mkdir()
    written = ctx.reports / _QUALITY
    if written.is_file():  # kept byte for byte, so a warm build's report equals a cold one's
        shutil.copy2(written, out / _QUALITY)
    return {"report": _json(ctx.quality)}


def _evaluate_restore(
    out: Path, meta: dict[str, Any], artifact: Artifact, ctx: StageContext, fresh: bool
) -> Artifact:
    from rslora_deploy.reports import QualityReport

    if meta["report"] is not None and not fresh:
        ctx.quality = QualityReport.model_validate(meta["report"])
        shutil.copy2(out / _QUALITY, ctx.reports / _QUALITY)
    return artifact


_POLICIES: dict[str, _Policy] = {
    "merge_adapter": _Policy(_merge_inputs, _move_into, _merge_restore),
    "quantize": _Policy(_quantize_inputs, _move_into, _restore_in_place),
    "export_onnx": _Policy(_export_inputs, _copy_into, _export_restore),
    "verify": _Policy(_verify_inputs, _save_report("smoke"), _verify_restore),
    "evaluate": _Policy(_evaluate_inputs, _evaluate_save, _evaluate_restore),
}
