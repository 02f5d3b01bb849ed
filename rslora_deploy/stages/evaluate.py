"""Stage ``evaluate``: perplexity, agreement, logit error and adapter survival of a build.

The numerics live in :mod:`rslora_deploy.evaluation`; this stage picks the models (merged,
quantized, the shipped model through the exporter's CPU-runnable view, and the base for survival)
and writes ``reports/quality.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rslora_deploy._fsutil import write_json
from rslora_deploy.artifact import Artifact
from rslora_deploy.config import BuildConfig, EvalConfig
from rslora_deploy.reports import QualityReport

if TYPE_CHECKING:
    from rslora_deploy.stages.base import StageContext

logger = logging.getLogger(__name__)


class EvaluateStage:
    """Stage ``evaluate`` (skipped with ``eval.enabled = false`` / ``--no-eval``)."""

    name: ClassVar[str] = "evaluate"

    def section(self, config: BuildConfig) -> EvalConfig:
        """The ``[eval]`` section."""
        return config.eval

    def run(self, artifact: Artifact, cfg: EvalConfig, ctx: StageContext) -> Artifact:
        """Evaluate the build's models; the report goes to ``ctx.quality`` and quality.json."""
        if not cfg.enabled or ctx.inputs is None:
            return artifact
        from rslora_deploy.evaluation.quality import evaluate_build

        merged = ctx.artifacts["merge_adapter"]
        quantized = ctx.artifacts["quantize"]
        base_dir = ctx.inputs.base.path
        survival_base = base_dir if merged.path != base_dir else None
        genre = cfg.survival_genre
        if genre is None and survival_base is not None and ctx.inputs.adapter_dir is not None:
            genre = brown_genre_of(ctx.inputs.adapter_dir)
        threshold = (
            cfg.survival_threshold
            if cfg.survival_threshold is not None
            else ctx.profile.survival_threshold
        )
        runnable = ctx.exporter.cpu_runnable(artifact.path, ctx.profile, ctx.work)
        if not (runnable / "genai_config.json").is_file():
            # The ONNX logit evaluation reads onnxruntime-genai folders; other exporters' graphs
            # (ascend-om: last-position logits only) are checked by their smoke test and tests.
            logger.info(
                "evaluate: %s is not an onnxruntime-genai folder; torch models only", runnable
            )
        quality = evaluate_build(
            merged.path,
            quantized.path,
            runnable if (runnable / "genai_config.json").is_file() else None,
            cfg,
            survival_base,
            survival_genre=genre,
            survival_threshold=threshold,
            onnx_tolerance=artifact.meta.get("parity_tolerance"),
        )
        quality = without_wall_times(quality)
        ctx.quality = QualityReport.model_validate(quality)
        write_json(ctx.reports / "quality.json", quality)
        return artifact


def without_wall_times(quality: dict[str, Any]) -> dict[str, Any]:
    """``quality`` without its wall-clock fields, which go to the log instead.

    quality.json is hashed into the manifest, so two builds of the same inputs must write the same
    bytes; the demo's two cold builds differed in exactly these fields (per-model ``seconds`` and
    ``load_seconds``). The stage's own time is in reports/build.json.
    """
    kept = {k: v for k, v in quality.items() if k != "seconds"}
    kept["models"] = {}
    for name, stats in quality.get("models", {}).items():
        timed = {k: stats[k] for k in ("seconds", "load_seconds") if k in stats}
        if timed:
            logger.info("evaluate: %s %s", name, timed)
        kept["models"][name] = {k: v for k, v in stats.items() if k not in timed}
    return kept


def brown_genre_of(adapter_dir: Path) -> str | None:
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
