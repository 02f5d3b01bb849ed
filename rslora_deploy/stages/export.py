"""Stage ``export_onnx``: quantized checkpoint -> the package's ``model/`` folder.

The stage itself knows no runtime: it hands the artifact to the profile's exporter
(``profile.exporter``, looked up in :data:`rslora_deploy.exporters.EXPORTERS`), which writes the
folder and returns it as an artifact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rslora_deploy.artifact import Artifact
from rslora_deploy.config import BuildConfig, ExportConfig

if TYPE_CHECKING:
    from rslora_deploy.stages.base import StageContext


class ExportStage:
    """Stage ``export_onnx``: run the profile's exporter into ``<package>/model``."""

    name: ClassVar[str] = "export_onnx"

    def section(self, config: BuildConfig) -> ExportConfig:
        """The ``[export]`` section."""
        return config.export

    def run(self, artifact: Artifact, cfg: ExportConfig, ctx: StageContext) -> Artifact:
        """Export ``artifact``; the exporter's log goes to the work dir."""
        return ctx.exporter.export(
            artifact, ctx.staging / "model", cfg, ctx.profile, ctx.work / "export.log"
        )
