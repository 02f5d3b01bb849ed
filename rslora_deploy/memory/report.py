"""The build's budget reports: measurement, solver answer and ``budget.html``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rslora_deploy.memory import html
from rslora_deploy.memory.estimate import package_shape
from rslora_deploy.memory.measure import MEASURED_REPORT, measure_or_explain, write_measured
from rslora_deploy.memory.solver import Layout, solve, summary
from rslora_deploy.model_view import ModelView
from rslora_deploy.profiles import DeviceProfile

HTML_REPORT = "budget.html"


def attach_solver(
    budget: dict[str, Any], layout: Layout, view: ModelView, profile: DeviceProfile, shape: Any
) -> None:
    """Put the solver's answer into an over-budget report (``solver`` and ``solver_summary``)."""
    if budget["fits"]:
        return
    answer = solve(layout, view, profile, shape)
    budget["solver"] = answer
    budget["solver_summary"] = summary(answer)


def finish_build_report(
    onnx_dir: Path,
    view: ModelView,
    profile: DeviceProfile,
    budget: dict[str, Any],
    reports: Path,
    layout: Layout,
) -> None:
    """Measure (or say why not), add the solver's answer when over budget, write the HTML page."""
    measured = measure_or_explain(onnx_dir, profile)
    write_measured(reports, measured, budget)
    # budget.json stays a function of the inputs: the readings live in budget.measured.json.
    budget["measured"] = {"status": measured["status"], "report": f"reports/{MEASURED_REPORT}"}
    attach_solver(budget, layout, view, profile, package_shape(onnx_dir, profile))
    html.write(
        reports / HTML_REPORT,
        [{"estimate": budget, "measured": measured}],
        f"Memory budget: {profile.name}",
    )
