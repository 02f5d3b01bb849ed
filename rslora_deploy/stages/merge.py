"""Stage ``merge_adapter``: base HF model + adapter -> merged plain HF model directory.

Order matters for fast failure: the adapter is fully validated (format, checksums, shapes it can
check alone) and the base's recorded hashes compared from the raw safetensors bytes before the
base model is loaded into torch, which is the slow part.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rslora_deploy._fsutil import write_json
from rslora_deploy.artifact import Artifact
from rslora_deploy.config import AdapterConfig, BuildConfig, MergeConfig, MergeDtype
from rslora_deploy.errors import InputError, RsloraDeployError

if TYPE_CHECKING:
    from rslora_deploy.adapters.detect import LoadedAdapter
    from rslora_deploy.adapters.merge_math import ModuleStats
    from rslora_deploy.stages.base import StageContext

logger = logging.getLogger(__name__)

REPORT_NAME = "merge_report.json"
# Tokenizer and chat files a HF directory may hold; copied verbatim so the merged model tokenizes
# exactly like the base.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
)


def _torch_dtype(dtype: MergeDtype) -> Any:
    import torch

    return {
        MergeDtype.AUTO: None,
        MergeDtype.FLOAT32: torch.float32,
        MergeDtype.FLOAT16: torch.float16,
        MergeDtype.BFLOAT16: torch.bfloat16,
    }[MergeDtype(dtype)]


def check_base_dir(base_dir: Path) -> None:
    """A HF directory with config.json and safetensors weights (never pickle)."""
    from rslora_deploy.adapters.base_hash import safetensors_files
    from rslora_deploy.adapters.st_io import SafetensorsFile
    from rslora_deploy.errors import AdapterFormatError

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise InputError(f"base {base_dir} is not a Hugging Face model directory (no config.json)")
    for path in safetensors_files(base_dir):
        try:
            SafetensorsFile(path)  # header only: truncation, corruption, pickle
        except AdapterFormatError as exc:
            raise InputError(f"base weights {exc.message}") from None


def load_base(base_dir: Path) -> Any:
    """Load the causal LM from safetensors only, without remote code, in its stored dtype."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            base_dir, dtype="auto", trust_remote_code=False, use_safetensors=True
        )
    except Exception as exc:  # transformers raises many types for a bad model directory
        raise InputError(
            f"cannot load base model {base_dir} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def _base_shapes(
    model: Any, names: list[str], rename: dict[str, str]
) -> dict[str, tuple[int, int]]:
    """Layer shapes keyed by the *recorded* names, looked up under their renamed names."""
    from rslora_deploy.adapters.merge_math import layer_layout, logical_shape, resolve_module
    from rslora_deploy.adapters.rename import rename_name

    shapes = {}
    for name in names:
        module = resolve_module(model, rename_name(name, rename), name)
        shapes[name] = logical_shape(module, layer_layout(module, name))
    return shapes


def write_hf_dir(model: Any, base_dir: Path, out_dir: Path) -> None:
    """save_pretrained (safetensors) plus the base's tokenizer and generation files."""
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)
    if (
        not (out_dir / "generation_config.json").is_file()
        and (base_dir / "generation_config.json").is_file()
    ):
        shutil.copy2(base_dir / "generation_config.json", out_dir / "generation_config.json")


def merge_adapter(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    merge_cfg: MergeConfig,
    adapter_cfg: AdapterConfig,
    base_quantization: dict[str, Any] | None = None,
) -> Artifact:
    """Merge the adapter at ``adapter_dir`` into the base at ``base_dir``; write ``out_dir``.

    Args:
        base_dir: Hugging Face model directory (safetensors weights).
        adapter_dir: RS-LoRA v1, PEFT LoRA or PEFT VeRA directory (detected from its files).
        out_dir: fresh directory to write (must not exist or be empty).
        merge_cfg: dtype, untie, fidelity threshold.
        adapter_cfg: allow_base_mismatch, allow_unverified_vera_regeneration, rename (prefix map
            applied to the recorded module names after loading, spec 5.2 step 1),
            allow_full_module_overrides (copy PEFT modules_to_save / trainable-token tensors with
            exact shape and dtype checks, spec 6.1; recorded under ``overrides`` in the report).
        base_quantization: what ``base_dir`` was dequantized from (a bitsandbytes 4-bit base,
            stage ``load``); recorded in the report, which then says the merge went into the
            dequantized Wq in fp32.

    Returns:
        ``Artifact(kind="hf", path=out_dir, meta={"adapter", "merge_report", "dtype", ...})``.

    Raises:
        RsloraDeployError: any catalogue error (E001-E080) or a bad path; out_dir is left empty.
    """
    from rslora_deploy.adapters.merge_math import stats_as_dicts, verify_base
    from rslora_deploy.adapters.rename import apply_renames

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(
            f"merge output {out_dir} already exists and is not empty; pass a fresh directory"
        )
    started = time.perf_counter()
    check_base_dir(base_dir)
    rename = dict(adapter_cfg.rename)
    adapter, model = _load_adapter(base_dir, adapter_dir, adapter_cfg, rename)
    logger.info("adapter %s: %s, %d modules", adapter_dir, adapter.format, len(adapter.deltas))
    # Renamed only now: RSG-1 keys and P~ checksums were derived from the recorded names while
    # loading, so P~ does not depend on the map (spec 9, module renames).
    renamed = apply_renames([*adapter.deltas, *adapter.overrides], rename)
    recorded = sorted({d.recorded_name or d.name for d in adapter.deltas})
    base_check = verify_base(
        base_dir,
        adapter.base_hashes,
        recorded,
        allow_mismatch=adapter_cfg.allow_base_mismatch,
        live_names=renamed,
    )
    if model is None:
        model = load_base(base_dir)
    created = not out_dir.exists()
    try:
        stats, copied, out_dtype = _merge_into(model, adapter, merge_cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_hf_dir(model, base_dir, out_dir)
        report: dict[str, Any] = {
            "adapter": adapter.meta,
            "base": str(base_dir),
            "base_check": base_check,
            "dtype": out_dtype,
            "untie": merge_cfg.untie,
            "rename": rename,
            "renamed": renamed,
            "fidelity_warn_threshold": merge_cfg.fidelity_warn_threshold,
            "modules": stats_as_dicts(stats),
            "overrides": copied,
            "summary": _summary(stats, merge_cfg.fidelity_warn_threshold),
            # No wall time here: the report is hashed in the package, and two builds of the same
            # inputs must give the same bytes; the stage's time is in reports/build.json.
        }
        if base_quantization is not None:
            report["base_quantization"] = base_quantization
        write_json(out_dir / REPORT_NAME, report)
    except (RsloraDeployError, OSError):
        _clean(out_dir, created)
        raise
    logger.info(
        "merged %d weights into %s (%s) in %.1f s",
        len(stats),
        out_dir,
        out_dtype,
        time.perf_counter() - started,
    )
    return _merged_artifact(out_dir, adapter, out_dtype, report)


def _merged_artifact(
    out_dir: Path, adapter: LoadedAdapter, out_dtype: str, report: dict[str, Any]
) -> Artifact:
    """The merge stage's artifact: the HF directory with the adapter's identity and the fidelity."""
    adapter_meta = {
        k: adapter.meta.get(k)
        for k in ("format", "sha256", "modules", "trainable_parameters", "r", "k", "path")
    }
    return Artifact(
        kind="hf",
        path=out_dir,
        meta={
            "adapter": adapter_meta,
            "merge_report": REPORT_NAME,
            "dtype": out_dtype,
            "max_relative_merge_error": report["summary"]["max_relative_merge_error"],
        },
    )


def _load_adapter(
    base_dir: Path, adapter_dir: Path, adapter_cfg: AdapterConfig, rename: dict[str, str]
) -> tuple[LoadedAdapter, Any]:
    """Load the adapter, and the base model too when the adapter needs its layer shapes.

    A format that regenerates from base shapes (VeRA without saved projections) names the
    modules; the base is then loaded once, here, and reused for the merge.

    Returns:
        (the adapter, the loaded base model or None when it was not needed yet).
    """
    from rslora_deploy.adapters.detect import base_shapes_needed, load_adapter

    names = base_shapes_needed(adapter_dir)
    if names and adapter_cfg.allow_unverified_vera_regeneration:
        model = load_base(base_dir)
        adapter = load_adapter(
            adapter_dir,
            allow_unverified_vera_regeneration=True,
            base_shapes=_base_shapes(model, names, rename),
            allow_full_module_overrides=adapter_cfg.allow_full_module_overrides,
        )
        return adapter, model
    adapter = load_adapter(
        adapter_dir,
        allow_unverified_vera_regeneration=adapter_cfg.allow_unverified_vera_regeneration,
        allow_full_module_overrides=adapter_cfg.allow_full_module_overrides,
    )
    return adapter, None


def _merge_into(
    model: Any, adapter: LoadedAdapter, merge_cfg: MergeConfig
) -> tuple[list[ModuleStats], list[dict[str, Any]], str]:
    """Copy the overrides, merge the deltas and cast the model to the merge dtype.

    Returns:
        (per-weight merge statistics, the copied overrides' report rows, the model's dtype name).
    """
    from rslora_deploy.adapters.merge_math import apply_overrides, merge_deltas

    target = _torch_dtype(merge_cfg.dtype)
    # Overrides first (all checked before any copy), so an untied lm_head clone made by the
    # delta merge already holds trainable-token rows written into a tied embedding.
    copied = apply_overrides(model, adapter.overrides, adapter.deltas, untie=merge_cfg.untie)
    stats = merge_deltas(
        model,
        adapter.deltas,
        dtype=target,
        untie=merge_cfg.untie,
        fidelity_warn_threshold=merge_cfg.fidelity_warn_threshold,
    )
    if target is not None:
        model.to(target)
    return stats, copied, str(next(model.parameters()).dtype).removeprefix("torch.")


def _summary(stats: list[Any], threshold: float) -> dict[str, Any]:
    errors = [s.relative_merge_error for s in stats]
    return {
        "merged_weights": len(stats),
        "max_relative_merge_error": max(errors, default=0.0),
        "max_lost_fraction": max((s.lost_fraction for s in stats), default=0.0),
        "modules_over_threshold": [s.module for s in stats if s.relative_merge_error > threshold],
    }


def _clean(out_dir: Path, created: bool) -> None:
    if out_dir.is_dir():
        for child in out_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
        if created:
            out_dir.rmdir()


class MergeStage:
    """Stage ``merge_adapter``: base + adapter -> merged HF dir (the base as it is without one)."""

    name: ClassVar[str] = "merge_adapter"

    def section(self, config: BuildConfig) -> MergeConfig:
        """The ``[merge]`` section (the ``[adapter]`` one is read from the context)."""
        return config.merge

    def run(self, artifact: Artifact, cfg: MergeConfig, ctx: StageContext) -> Artifact:
        """Merge ``ctx.inputs.adapter_dir`` into ``artifact``; copy the merge report."""
        adapter_dir = ctx.inputs.adapter_dir if ctx.inputs else None
        if adapter_dir is None:
            logger.info("merge: no adapter, deploying the base model as it is")
            return artifact
        merged = merge_adapter(
            artifact.path,
            adapter_dir,
            ctx.work / "merged",
            cfg,
            ctx.config.adapter,
            base_quantization=ctx.inputs.base_quantization if ctx.inputs else None,
        )
        report = merged.path / "merge_report.json"
        if report.is_file():
            shutil.copy2(report, ctx.reports / "merge_report.json")
        return merged
