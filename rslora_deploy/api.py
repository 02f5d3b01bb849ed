"""``build()``: run the pipeline, load -> merge -> quantize -> export -> verify -> package.

The full order is load, merge_adapter, quantize, export_onnx, export_adapters, verify, evaluate,
check_budget, package. Every stage follows one contract (:class:`rslora_deploy.stages.base.Stage`):
artifact in, artifact out, ``run(artifact, cfg, ctx)``. The package is assembled in a staging
folder beside the output path and renamed into place at the end
(:func:`rslora_deploy.stages.package.staged_output`); per-stage wall time and peak RSS go into
``reports/build.json``, which ``benchmarks/bench_build.py`` turns into docs/benchmarks.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rslora_deploy.artifact import Artifact
from rslora_deploy.config import BuildConfig
from rslora_deploy.reports import BudgetReport
from rslora_deploy.stages.base import Stage, StageCallback, StageContext, StageRecord, run_stage


@dataclass
class BuildResult:
    """What a finished build produced."""

    package_dir: Path
    manifest: dict[str, Any]
    budget: BudgetReport
    stages: list[StageRecord] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        """Whether the estimate is within the profile's memory budget."""
        return self.budget.fits


def pipeline() -> list[Stage]:
    """The stages ``build`` runs after ``load``, in order."""
    from rslora_deploy.stages.adapters import RuntimeAdaptersStage
    from rslora_deploy.stages.budget import BudgetStage
    from rslora_deploy.stages.evaluate import EvaluateStage
    from rslora_deploy.stages.export import ExportStage
    from rslora_deploy.stages.merge import MergeStage
    from rslora_deploy.stages.package import PackageStage
    from rslora_deploy.stages.quantize import QuantizeStage
    from rslora_deploy.stages.verify import VerifyStage

    return [
        MergeStage(),
        QuantizeStage(),
        ExportStage(),
        RuntimeAdaptersStage(),
        VerifyStage(),
        EvaluateStage(),
        BudgetStage(),
        PackageStage(),
    ]


def build(
    config: BuildConfig, *, on_stage: StageCallback | None = None, cache: bool = True
) -> BuildResult:
    """Build a deployable package from ``config``.

    Args:
        config: the resolved build configuration.
        on_stage: optional progress callback.
        cache: reuse and store stage outputs in the stage cache (docs/reproducibility.md);
            False (``--no-cache``) runs every stage and touches no cache.

    Returns:
        The package location, its manifest and the budget verdict. A package that does not fit
        is still written; the caller decides what that means (the CLI exits 3).

    Raises:
        RsloraDeployError: any stage failed; nothing is left at ``config.out``.
    """
    from rslora_deploy._fsutil import staged_output
    from rslora_deploy.exporters import get_exporter
    from rslora_deploy.profiles import load_profile
    from rslora_deploy.stages.cache import StageCache
    from rslora_deploy.stages.load import LoadStage
    from rslora_deploy.stages.resume import BuildCache

    profile = load_profile(config.profile)
    exporter = get_exporter(profile.exporter)
    # The exporter refuses options it cannot honour on this profile (a layout the target cannot
    # run, gears beyond the KV length) before minutes of merging and quantizing.
    exporter.check_config(config.export, profile)
    unset = Path()
    ctx = StageContext(config, profile, exporter, work=unset, reports=unset, staging=unset)
    if on_stage is not None:
        ctx.on_stage = on_stage
    ctx.cache = BuildCache(StageCache(enabled=cache))
    # Load runs before anything is created, so a wrong path fails in a second and leaves nothing.
    artifact = run_stage(LoadStage(), Artifact("request", Path.cwd()), ctx)
    with staged_output(config.out, config.overwrite) as staging:
        ctx.staging, ctx.work, ctx.reports = staging, staging / "_work", staging / "reports"
        ctx.work.mkdir()
        ctx.reports.mkdir()
        for stage in pipeline():
            artifact = run_stage(stage, artifact, ctx)
    manifest = json.loads((Path(config.out) / "manifest.json").read_text())
    assert ctx.budget is not None  # the check_budget stage always sets it
    return BuildResult(Path(config.out), manifest, ctx.budget, ctx.records)
