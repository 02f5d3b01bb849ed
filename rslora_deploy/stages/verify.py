"""Stage ``verify``: generate from a fixed prompt with the exported bytes, in a child process.

The exporter knows how its runtime loads the folder (onnxruntime-genai for the default exporter,
through a CPU-provider view of a CUDA-target graph on machines without a GPU); this stage records
the result as a typed :class:`~rslora_deploy.reports.SmokeReport`. A model that cannot be loaded or
run fails the build here, before evaluation and packaging.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rslora_deploy.artifact import Artifact
from rslora_deploy.config import BuildConfig, ExportConfig
from rslora_deploy.reports import SmokeReport

if TYPE_CHECKING:
    from rslora_deploy.stages.base import StageContext


class VerifyStage:
    """Stage ``verify``: the exporter's smoke test on the shipped model folder."""

    name: ClassVar[str] = "verify"

    def section(self, config: BuildConfig) -> ExportConfig:
        """The ``[export]`` section (the smoke test follows what was exported)."""
        return config.export

    def run(self, artifact: Artifact, cfg: ExportConfig, ctx: StageContext) -> Artifact:
        """Smoke-test ``artifact``; the report goes to ``ctx.smoke``."""
        ctx.smoke = SmokeReport.model_validate(
            ctx.exporter.smoke_test(artifact.path, ctx.profile, ctx.work)
        )
        return artifact
