"""The build's budget reports on the tiny export: measured, solver answer when over, HTML page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rslora_deploy.memory.estimate import estimate
from rslora_deploy.memory.report import finish_build_report
from rslora_deploy.memory.solver import Layout
from rslora_deploy.model_view import view_from_genai
from rslora_deploy.profiles import load_profile


def test_over_budget_build_report_carries_the_solver(tiny_onnx_cpu: Path, tmp_path: Path) -> None:
    view = view_from_genai(tiny_onnx_cpu)
    # A budget the tiny model cannot meet at max_length 128, but can at a shorter context.
    # load_factor 1: the run (which a shorter context shrinks) is the peak, not the load.
    base = load_profile("cpu-2gb").model_copy(update={"reserved_bytes": 1, "load_factor": 1.0})
    just_short = estimate(tiny_onnx_cpu, view, base)["estimate_bytes"] - 1
    profile = base.model_copy(update={"memory_bytes": just_short})
    budget = estimate(tiny_onnx_cpu, view, profile)
    assert budget["fits"] is False
    reports = tmp_path / "reports"
    layout = Layout(budget["terms_bytes"]["weights"], 4, 64, False)
    finish_build_report(tiny_onnx_cpu, view, profile, budget, reports, layout)
    answer = budget["solver"]
    assert answer["largest_max_length"] is not None
    assert answer["largest_max_length"] < 128
    assert (
        f"largest max_length that fits is {answer['largest_max_length']}"
        in (budget["solver_summary"])
    )
    measured = json.loads((reports / "budget.measured.json").read_text())
    assert measured["status"] == "measured"
    assert budget["measured"] == {"status": "measured", "report": "reports/budget.measured.json"}
    page = (reports / "budget.html").read_text()
    assert "measured" in page
    assert "<svg" in page


def test_cuda_profile_on_a_cpu_machine_is_not_measured(tiny_onnx_cpu: Path, tmp_path: Path) -> None:
    from rslora_deploy.memory.readers import device_present

    if device_present("cuda"):
        pytest.skip("this machine has an NVIDIA GPU, so t4-2gb is measured here, not refused")
    profile = load_profile("t4-2gb")
    view = view_from_genai(tiny_onnx_cpu)
    budget = estimate(tiny_onnx_cpu, view, profile)
    finish_build_report(tiny_onnx_cpu, view, profile, budget, tmp_path, Layout(1, 4, 64, False))
    measured = json.loads((tmp_path / "budget.measured.json").read_text())
    assert measured["status"] == "not measured"
    assert "cuda" in measured["reason"]
    assert "probes_bytes" not in measured
