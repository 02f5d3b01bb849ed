"""``budget --measure``: report arithmetic with a fake probe, a real CPU run, absent devices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rslora_deploy.errors import InputError
from rslora_deploy.memory.measure import compare, measure_package, write_measured
from rslora_deploy.profiles import load_profile


def _fake_probe(args: dict[str, Any]) -> dict[str, Any]:
    if args["probe"] == "context":
        assert Path(args["graph"]).is_file()  # the one-node graph is written for the probe
        return {"probe": "context", "peak_bytes": 700}
    return {
        "probe": "worst", "prompt_tokens": args["max_length"] - 16,
        "final_length": args["max_length"], "load_peak_bytes": 900,
        "after_prefill_bytes": 1300, "run_peak_bytes": 1350, "peak_bytes": 1350,
        "runtime": {"onnxruntime-genai": "x"},
        "device": {"device": "Fake GPU", "driver": "580", "method": "NVML"},
    }  # fmt: skip


def test_report_from_probes(tmp_path: Path) -> None:
    (tmp_path / "genai_config.json").write_text('{"search": {"max_length": 2048}}')
    profile = load_profile("t4-2gb")
    report = measure_package(tmp_path, profile, probe=_fake_probe, present=lambda kind: True)
    assert report["status"] == "measured"
    assert report["device_kind"] == "cuda"
    assert (report["device"], report["driver"]) == ("Fake GPU", "580")
    assert report["max_length"] == 2048
    assert report["prompt_tokens"] == 2032
    assert report["probes_bytes"] == {
        "context": 700, "load_peak": 900, "after_prefill": 1300, "run_peak": 1350,
        "worst_case_peak": 1350,
    }  # fmt: skip
    assert report["model_dependent_bytes"] == 650
    assert compare(report, {"estimate_bytes": 1485}) == {
        "status": "measured", "estimate_bytes": 1485, "measured_peak_bytes": 1350,
        "estimate_over_measured": 1.1, "estimate_covers_measured": True,
    }  # fmt: skip
    path = write_measured(tmp_path / "reports", report, {"estimate_bytes": 1000})
    assert json.loads(path.read_text())["versus_estimate"]["estimate_covers_measured"] is False


@pytest.mark.parametrize(
    ("profile", "device"), [("t4-2gb", "NVIDIA GPU"), ("ascend-310p-2gb", "Ascend")]
)
def test_absent_device_is_an_error_naming_it(tmp_path: Path, profile: str, device: str) -> None:
    (tmp_path / "genai_config.json").write_text('{"search": {"max_length": 64}}')
    with pytest.raises(InputError, match=device):
        measure_package(tmp_path, load_profile(profile), probe=_fake_probe, present=lambda k: False)


def test_real_cpu_measurement(tiny_onnx_cpu: Path) -> None:
    """Both probes in real child processes on the tiny export: the numbers are RSS, and ordered.

    Not ``context < worst``: the context probe also holds the onnxruntime Python binding (an upper
    bound of the runtime, docs/budget.md), which on this 1 MB model outweighs the model itself
    (CI: 91.4 vs 88.2 MiB). The arithmetic between the two is checked instead.
    """
    report = measure_package(tiny_onnx_cpu, load_profile("cpu-2gb"), max_length=64)
    probes = report["probes_bytes"]
    assert report["final_length"] == 64
    assert 50 * 2**20 < probes["context"] < 2**31
    assert 50 * 2**20 < probes["worst_case_peak"] < 2**31
    assert report["model_dependent_bytes"] == probes["worst_case_peak"] - probes["context"]
    assert probes["after_prefill"] <= probes["run_peak"] <= probes["worst_case_peak"]
    assert max(probes["load_peak"], probes["run_peak"]) == probes["worst_case_peak"]
    assert report["runtime"]["onnxruntime-genai"]
    assert "VmHWM" in report["method"]
