"""``build()``: run the stages load -> merge -> quantize -> export -> verify -> budget -> package.

Each stage is artifact in, artifact out, and writes only into its own directory under a staging
folder beside the output path; the finished package is renamed into place at the end
(:func:`rslora_deploy.stages.package.staged_output`). Per-stage wall time and peak RSS go into
``reports/build.json``; ``benchmarks/bench_build.py`` turns them into docs/benchmarks.md.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rslora_deploy.artifact import Artifact
from rslora_deploy.config import BuildConfig
from rslora_deploy.data.assets import sha256_file
from rslora_deploy.model_view import model_view
from rslora_deploy.profiles import DeviceProfile, load_profile
from rslora_deploy.stages.base import StageRecord, measured

logger = logging.getLogger(__name__)

StageCallback = Callable[[str, str], None]
"""Called as ``on_stage(stage_name, "start" | "end")``; the CLI uses it for progress display."""


@dataclass
class BuildResult:
    """What a finished build produced."""

    package_dir: Path
    manifest: dict[str, Any]
    budget: dict[str, Any]
    stages: list[StageRecord] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        """Whether the estimate is within the profile's memory budget."""
        return bool(self.budget["fits"])


def describe_dir(path: Path, name: str | None = None) -> dict[str, Any]:
    """Name, path and per-file sha256 of the weight/config files of a model or adapter dir."""
    files = {
        p.name: sha256_file(p)
        for p in sorted(path.iterdir())
        if p.is_file() and p.suffix in (".json", ".safetensors", ".gguf")
    }
    return {"name": name or path.name, "path": str(path), "sha256": files}


class _Runner:
    """Runs stages in order, measuring each and reporting progress."""

    def __init__(self, on_stage: StageCallback | None) -> None:
        self.records: list[StageRecord] = []
        self.on_stage = on_stage or (lambda name, event: None)

    def run(self, name: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.on_stage(name, "start")
        logger.info("stage %s: start", name)
        with measured(name) as record:
            result = func(*args, **kwargs)
        self.records.append(record)
        logger.info(
            "stage %s: done in %.1f s, peak RSS %.0f MiB",
            name,
            record.seconds,
            record.peak_rss_bytes / 2**20,
        )
        self.on_stage(name, "end")
        return result


def build(config: BuildConfig, *, on_stage: StageCallback | None = None) -> BuildResult:
    """Build a deployable package from ``config``.

    Args:
        config: the resolved build configuration.
        on_stage: optional progress callback.

    Returns:
        The package location, its manifest and the budget verdict. A package that does not fit
        is still written; the caller decides what that means (the CLI exits 3).

    Raises:
        RsloraDeployError: any stage failed; nothing is left at ``config.out``.
    """
    from rslora_deploy.exporters.genai.builder import cpu_view, export_onnx
    from rslora_deploy.stages import budget as budget_stage
    from rslora_deploy.stages.load import load_inputs
    from rslora_deploy.stages.package import staged_output, write_manifest, write_model_card
    from rslora_deploy.stages.verify import smoke_generate

    profile = load_profile(config.profile)
    runner = _Runner(on_stage)
    inputs = runner.run("load", load_inputs, config)
    if config.quantize.protect_adapter and inputs.adapter_dir is None:
        from rslora_deploy.errors import ConfigError

        raise ConfigError(
            "--protect-adapter keeps the adapter's modules at 8 bits, but this build merges no "
            "adapter; pass --adapter or drop --protect-adapter"
        )
    with staged_output(config.out, config.overwrite) as staging:
        work, reports = staging / "_work", staging / "reports"
        work.mkdir()
        reports.mkdir()
        merged = _merge(runner, inputs.base, inputs.adapter_dir, work, config, reports)
        quantized = _quantize(runner, inputs.base, merged, work, config)
        onnx = runner.run(
            "export_onnx",
            export_onnx,
            quantized,
            staging / "model",
            config.export,
            profile,
            work / "export.log",
        )
        view_dir = (
            cpu_view(onnx.path, work / "cpu_view") if profile.export_target != "cpu" else onnx.path
        )
        smoke = runner.run("verify", smoke_generate, view_dir)
        quality = _evaluate(runner, merged, quantized, view_dir, inputs, config, reports, profile)
        view = model_view(merged.path)
        budget = runner.run("check_budget", budget_stage.estimate, onnx.path, view, profile)
        budget["measured_cpu"] = measured_cpu(smoke, profile)
        _write_json(reports / "budget.json", budget)
        _write_json(reports / "build.json", _build_report(runner.records, config, profile))
        if config.package.keep_quantized_checkpoint and quantized.path.is_relative_to(work):
            shutil.move(quantized.path, staging / "quantized")
        shutil.rmtree(work)
        manifest_body = _manifest_body(
            config, profile, inputs, merged, quantized, onnx, budget, smoke, quality
        )
        runner.run("package", _package, staging, manifest_body, write_manifest, write_model_card)
    manifest = json.loads((Path(config.out) / "manifest.json").read_text())
    return BuildResult(Path(config.out), manifest, budget, runner.records)


def measured_cpu(smoke: dict[str, Any], profile: DeviceProfile) -> dict[str, Any]:
    """The verify run's peak RSS, with what it does and does not show for this profile.

    The KV cache is preallocated to the package's max_length in that run, so for a CPU-target
    export (the Ascend profiles, whose int4 kernels run on the host CPU) it is a real measurement
    of the runtime; the estimate must cover it (tests/integration/test_build_real.py). A CUDA-target
    graph run on the CPU EP gets fp32 casts of its fp16 tensors, so there it is only a smoke check.
    """
    comparable = profile.export_target == "cpu"
    return {
        "peak_rss_bytes": smoke["peak_rss_bytes"],
        "kv_max_length": smoke.get("kv_max_length"),
        "comparable_to_estimate": comparable,
        "note": (
            "peak RSS of onnxruntime-genai running this package on the CPU with its full KV cache"
            if comparable
            else "CPU proxy run of a CUDA-target fp16 graph (the CPU EP adds fp32 casts): a "
            "smoke check only, not the device's memory"
        ),
    }


def _merge(
    runner: _Runner,
    base: Artifact,
    adapter_dir: Path | None,
    work: Path,
    config: BuildConfig,
    reports: Path,
) -> Artifact:
    if adapter_dir is None:
        logger.info("merge: no adapter, deploying the base model as it is")
        return base
    from rslora_deploy.stages.merge import merge_adapter

    merged: Artifact = runner.run(
        "merge_adapter",
        merge_adapter,
        base.path,
        adapter_dir,
        work / "merged",
        config.merge,
        config.adapter,
    )
    report = merged.path / "merge_report.json"
    if report.is_file():
        shutil.copy2(report, reports / "merge_report.json")
    return merged


def _quantize(
    runner: _Runner, base: Artifact, merged: Artifact, work: Path, config: BuildConfig
) -> Artifact:
    from rslora_deploy.stages.quantize import is_prequantized, quantize_model

    # An already-quantized input is checked (config against tensors) and passed through.
    extras, protection = None, None
    if config.quantize.protect_adapter and not is_prequantized(merged.path):
        from rslora_deploy.quantizers.protection import plan_protection

        extras, protection = plan_protection(
            base.path, merged.path, config.quantize, config.quantize.protect_ratio
        )
    result: Artifact = runner.run(
        "quantize", quantize_model, merged, work / "quantized", config.quantize, extras=extras
    )
    if protection is not None:
        # The regex list is in the checkpoint's quantization_config; the manifest keeps the count.
        result.meta.get("extras", {}).pop("dynamic", None)
        result.meta["protection"] = protection
    return result


def _evaluate(
    runner: _Runner,
    merged: Artifact,
    quantized: Artifact,
    onnx_dir: Path,
    inputs: Any,
    config: BuildConfig,
    reports: Path,
    profile: DeviceProfile,
) -> dict[str, Any] | None:
    if not config.eval.enabled:
        return None
    from rslora_deploy.evaluation.quality import evaluate_build

    base_dir = inputs.base.path
    survival_base = base_dir if merged.path != base_dir else None
    genre = config.eval.survival_genre
    if genre is None and survival_base is not None and inputs.adapter_dir is not None:
        genre = _brown_genre_of(inputs.adapter_dir)
    quality: dict[str, Any] = runner.run(
        "evaluate",
        evaluate_build,
        merged.path,
        quantized.path,
        onnx_dir,
        config.eval,
        survival_base,
        survival_genre=genre,
        survival_threshold=(
            config.eval.survival_threshold
            if config.eval.survival_threshold is not None
            else profile.survival_threshold
        ),
    )
    _write_json(reports / "quality.json", quality)
    return quality


def _brown_genre_of(adapter_dir: Path) -> str | None:
    """The Brown genre an RS-LoRA adapter was trained on, from its ``task_id`` ("brown-<genre>").

    The demo adapter records its training domain this way; any other adapter returns None and
    survival is measured on all genres unless ``eval.survival_genre`` names one.
    """
    config_path = adapter_dir / "rslora_config.json"
    if not config_path.is_file():
        return None
    try:
        task_id = str(json.loads(config_path.read_text()).get("task_id", ""))
    except (OSError, ValueError):
        return None
    return task_id.removeprefix("brown-") if task_id.startswith("brown-") else None


def _package(staging: Path, body: dict[str, Any], write_manifest: Any, write_card: Any) -> None:
    """Model card first (it is one of the files the manifest hashes), then the manifest."""
    from rslora_deploy.stages.package import manifest_header

    header = manifest_header()
    write_card(staging, {**header, **body})
    write_manifest(staging, body, created_utc=header.get("created_utc"))


def _manifest_body(
    config: BuildConfig,
    profile: DeviceProfile,
    inputs: Any,
    merged: Artifact,
    quantized: Artifact,
    onnx: Artifact,
    budget: dict[str, Any],
    smoke: dict[str, Any],
    quality: dict[str, Any] | None,
) -> dict[str, Any]:
    adapter = None
    if inputs.adapter_dir is not None:
        adapter = {**describe_dir(inputs.adapter_dir), **merged.meta.get("adapter", {})}
    base_name = "SmolLM2-135M-Instruct" if inputs.is_default_base else inputs.base.path.name
    return {
        "profile": profile.model_dump(mode="json"),
        "inputs": {"base": describe_dir(inputs.base.path, base_name), "adapter": adapter},
        "quantization": {k: v for k, v in quantized.meta.items() if k != "seconds"},
        "export": onnx.meta,
        "budget": {k: budget[k] for k in ("fits", "budget_bytes", "estimate_bytes")},
        "smoke_test": {k: smoke[k] for k in ("prompt", "text", "runtime")},
        "quality": _quality_summary(quality, config.quantize.protect_adapter),
        "config": config.to_json_dict(),
    }


def _quality_summary(quality: dict[str, Any] | None, protected: bool = False) -> dict[str, Any]:
    """The headline numbers of ``reports/quality.json`` for the manifest and model card."""
    if not quality:
        return {}
    summary: dict[str, Any] = {}
    for name, stats in quality.get("models", {}).items():
        summary[f"perplexity_{name}"] = round(stats["perplexity"], 3)
        if name != "merged" and "greedy_agreement" in stats:
            summary[f"greedy_agreement_{name}"] = round(stats["greedy_agreement"], 4)
    errors = quality.get("relative_logit_error", {})
    if "onnx_vs_quantized" in errors:
        summary["onnx_vs_torch_relative_logit_error"] = round(errors["onnx_vs_quantized"], 5)
    survival = quality.get("survival")
    if isinstance(survival, dict) and "retained" in survival:
        summary["adapter_survival_retained"] = round(survival["retained"], 3)
        if survival.get("warning"):
            fix = (
                "raise quantize.protect_ratio (1.0 keeps every adapter module at 8 bits)"
                if protected
                else "rebuild with --protect-adapter"
            )
            summary["adapter_survival_warning"] = f"below {survival.get('threshold')}: {fix}"
    protocol = quality.get("protocol", {})
    if "scored_tokens" in protocol:
        summary["eval_tokens"] = protocol["scored_tokens"]
    return summary


def _build_report(
    records: list[StageRecord], config: BuildConfig, profile: DeviceProfile
) -> dict[str, Any]:
    return {
        "profile": profile.name,
        "stages": [
            {"name": r.name, "seconds": r.seconds, "peak_rss_bytes": r.peak_rss_bytes}
            for r in records
        ],
        "config": config.to_json_dict(),
    }


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
