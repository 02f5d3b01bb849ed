"""The stage contract: the ``Stage`` protocol, the ``StageContext`` and per-stage measurement.

Every stage is artifact in, artifact out (``run(artifact, cfg, ctx) -> Artifact``); ``api.build``
runs them in order through :func:`run_stage`, which times each one and samples its peak RSS.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from rslora_deploy.artifact import Artifact
from rslora_deploy.config import BuildConfig
from rslora_deploy.profiles import DeviceProfile
from rslora_deploy.reports import BudgetReport, QualityReport, SmokeReport

if TYPE_CHECKING:
    from rslora_deploy.exporters.base import Exporter
    from rslora_deploy.stages.load import ResolvedInputs
    from rslora_deploy.stages.resume import BuildCache

logger = logging.getLogger(__name__)


@dataclass
class StageRecord:
    """Wall time and peak RSS (this process plus its children) of one stage."""

    name: str
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    extra: dict[str, object] = field(default_factory=dict)


def _tree_rss() -> int:
    import psutil

    proc = psutil.Process()
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # the child exited between listing and reading
            continue
    return int(total)


@contextmanager
def measured(name: str, interval: float = 0.1) -> Iterator[StageRecord]:
    """Time a block and sample the RSS of this process tree every ``interval`` seconds.

    Sampling (not ``ru_maxrss``) is used because ru_maxrss only ever grows over a process's life,
    so it cannot attribute a peak to the stage that caused it.
    """
    record = StageRecord(name)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            record.peak_rss_bytes = max(record.peak_rss_bytes, _tree_rss())
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        yield record
    finally:
        stop.set()
        thread.join()
        record.seconds = round(time.perf_counter() - start, 3)


StageCallback = Callable[[str, str], None]
"""Called as ``on_stage(stage_name, "start" | "end")``; the CLI uses it for progress display."""


@dataclass
class StageContext:
    """What every stage of one build shares besides the artifact it is handed.

    Attributes:
        config: the whole resolved build configuration.
        profile: the device profile.
        exporter: the profile's exporter (budget and verify ask it, never the target string).
        work: scratch directory, removed before packaging.
        reports: the package's ``reports/`` directory; a stage writes its report here.
        staging: the package being assembled (renamed into place at the end).
        on_stage: progress callback.
        records: per-stage time and peak RSS, in run order.
        inputs: the resolved base model and adapter (stage ``load``).
        artifacts: every stage's output artifact, by stage name.
        smoke: the smoke-test report (stage ``verify``).
        quality: the quality report (stage ``evaluate``; None when skipped).
        budget: the budget report (stage ``check_budget``).
        runtime_adapters: a multi-adapter package's per-adapter manifest records (stage
            ``export_adapters``; None for a single merged adapter).
        cache: the stage cache and the keys of this build (None: every stage runs).
    """

    config: BuildConfig
    profile: DeviceProfile
    exporter: Exporter
    work: Path
    reports: Path
    staging: Path
    on_stage: StageCallback = field(default=lambda name, event: None)
    records: list[StageRecord] = field(default_factory=list)
    inputs: ResolvedInputs | None = None
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    smoke: SmokeReport | None = None
    quality: QualityReport | None = None
    budget: BudgetReport | None = None
    runtime_adapters: list[dict[str, Any]] | None = None
    cache: BuildCache | None = None


class Stage(Protocol):
    """One pipeline step: artifact in, artifact out (style guide §2; Olive ``Pass``).

    ``cfg`` is the stage's own section of the build config (``config.quantize`` for quantize...),
    ``ctx`` the shared context. A stage writes only below ``ctx.work`` (its own subdirectory),
    ``ctx.reports`` (its own report file) or, for export and package, the package itself.
    """

    name: ClassVar[str]
    """Stage name, as it appears in ``reports/build.json`` and the log."""

    def section(self, config: BuildConfig) -> Any:
        """The part of the build config this stage reads."""

    def run(self, artifact: Artifact, cfg: Any, ctx: StageContext) -> Artifact:
        """Run the stage on ``artifact`` and return its output artifact."""


def run_stage(stage: Stage, artifact: Artifact, ctx: StageContext) -> Artifact:
    """Run one stage, measuring its time and peak RSS and reporting progress."""
    ctx.on_stage(stage.name, "start")
    logger.info("stage %s: start", stage.name)
    from rslora_deploy.stages.resume import run_cached

    with measured(stage.name) as record:
        # A cached stage logs "stage X: cached" and restores its output instead of running.
        result = run_cached(stage, artifact, ctx)
    ctx.records.append(record)
    ctx.artifacts[stage.name] = result
    logger.info(
        "stage %s: done in %.1f s, peak RSS %.0f MiB",
        stage.name,
        record.seconds,
        record.peak_rss_bytes / 2**20,
    )
    ctx.on_stage(stage.name, "end")
    return result
