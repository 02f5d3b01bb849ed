"""Stage ``check_budget``: the memory estimate of the exported model against the profile.

The arithmetic is :mod:`rslora_deploy.memory.estimate` (docs/budget.md); this stage writes
``reports/budget.json``, measures the package on the build machine when the profile's device is
here (``reports/budget.measured.json``, "not measured" with the reason otherwise), puts the
solver's answer into an over-budget report, and draws ``reports/budget.html``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rslora_deploy._fsutil import write_json
from rslora_deploy.artifact import Artifact
from rslora_deploy.config import BuildConfig, ExportConfig
from rslora_deploy.memory.estimate import (  # noqa: F401  (the stage's public arithmetic)
    MODEL_FILE_SUFFIXES,
    Shape,
    decoder_linear_params,
    estimate,
    estimate_from_weights,
    exporter_of,
    io_bytes,
    package_shape,
    predict_weight_bytes,
    weight_bytes,
)
from rslora_deploy.model_view import model_view
from rslora_deploy.reports import BudgetReport

if TYPE_CHECKING:
    from rslora_deploy.stages.base import StageContext


class BudgetStage:
    """Stage ``check_budget``: the estimate of the exported model against the profile."""

    name: ClassVar[str] = "check_budget"

    def section(self, config: BuildConfig) -> ExportConfig:
        """The ``[export]`` section (the budget follows what was exported)."""
        return config.export

    def run(self, artifact: Artifact, cfg: ExportConfig, ctx: StageContext) -> Artifact:
        """Estimate, measure (or say why not), solve when over, write the budget reports."""
        from rslora_deploy.memory.report import finish_build_report
        from rslora_deploy.memory.solver import Layout

        view = model_view(ctx.artifacts["merge_adapter"].path)
        adapter_bytes = sum(a["bytes"] for a in ctx.runtime_adapters or [])
        budget = estimate(artifact.path, view, ctx.profile, adapter_bytes)
        quant = ctx.config.quantize
        # Whether lm_head is int4 is read from the exported graph (the layout's "auto" resolves
        # per target; the legacy cfg.lm_head_int4 flag alone would miss lm_head = "int4").
        int4_head = not budget["inputs"]["float_lm_head"]
        layout = Layout(budget["terms_bytes"]["weights"], quant.bits, quant.group_size, int4_head)
        finish_build_report(artifact.path, view, ctx.profile, budget, ctx.reports, layout)
        report = BudgetReport.model_validate(budget)
        write_json(ctx.reports / "budget.json", report.to_json())
        ctx.budget = report
        return artifact
