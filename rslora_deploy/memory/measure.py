"""``budget --measure``: run a package's worst case on the device and set it beside the estimate.

Two probes, each in its own child process (:mod:`rslora_deploy.memory.probe`):

    context     the runtime with no model (a one-node session on the device's provider)
    worst       prompt of max_length - 16 tokens, greedy decode to max_length

    model_dependent = worst - context     (what weights, KV cache, logits and activations cost)

The report (``reports/budget.measured.json``) names the method, the device, its driver and the
runtime versions, and every probe's bytes. A device that is not on this machine is never
"measured": asking for it is an error (nothing written), and the build records "not measured"
with the reason.
"""

from __future__ import annotations

import datetime
import json
import logging
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rslora_deploy.errors import ExportValidationError, InputError
from rslora_deploy.memory.probe import DECODE_TOKENS, one_node_graph
from rslora_deploy.memory.readers import device_present
from rslora_deploy.profiles import DeviceProfile

logger = logging.getLogger(__name__)

MEASURED_REPORT = "budget.measured.json"
GENAI_EXPORTER = "onnxruntime-genai"
DEVICE_WORDS = {"cpu": "a CPU", "cuda": "an NVIDIA GPU (NVML)", "npu": "an Ascend NPU (torch_npu)"}

ProbeFn = Callable[[dict[str, Any]], dict[str, Any]]


def run_probe(args: dict[str, Any]) -> dict[str, Any]:
    """Run one probe in a fresh child process and return its JSON.

    Raises:
        ExportValidationError: the runtime could not load or run the package.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "rslora_deploy.memory.probe", json.dumps(args)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExportValidationError(
            f"memory probe {args['probe']!r} failed on {args['kind']}: {tail[:300]}"
        )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def package_max_length(onnx_dir: Path) -> int:
    """``search.max_length`` of the package's ``genai_config.json`` (what the cache is sized to)."""
    config = json.loads((Path(onnx_dir) / "genai_config.json").read_text(encoding="utf-8"))
    return int(config["search"]["max_length"])


def require_device(kind: str, present: Callable[[str], bool] = device_present) -> None:
    """Raise when no ``kind`` device can be read here.

    Raises:
        InputError: naming the device and what to do.
    """
    if not present(kind):
        raise InputError(
            f"--measure needs {DEVICE_WORDS.get(kind, kind)} for this profile's device "
            f"'{kind}', and none can be read on this machine; run it on the device, or drop "
            "--measure for the estimate alone"
        )


def measure_package(
    onnx_dir: Path,
    profile: DeviceProfile,
    *,
    max_length: int | None = None,
    probe: ProbeFn = run_probe,
    present: Callable[[str], bool] = device_present,
) -> dict[str, Any]:
    """Measure ``onnx_dir``'s worst case on ``profile``'s device.

    Raises:
        InputError: the device is absent, or ``max_length`` leaves no room for a prompt.
        ExportValidationError: a probe failed.
    """
    kind = profile.device.value
    require_device(kind, present)
    length = max_length or package_max_length(onnx_dir)
    if length <= DECODE_TOKENS:
        raise InputError(f"max_length {length} must exceed the {DECODE_TOKENS} decoded tokens")
    with tempfile.TemporaryDirectory(prefix="rslora-probe-") as tmp:
        graph = one_node_graph(Path(tmp) / "context.onnx")
        context = probe({"probe": "context", "kind": kind, "graph": str(graph)})
    worst = probe({"probe": "worst", "kind": kind, "onnx_dir": str(onnx_dir), "max_length": length})
    device = worst.get("device", {})
    logger.info(
        "measure: %s context %.1f MiB, worst case %.1f MiB at max_length %d",
        kind, context["peak_bytes"] / 2**20, worst["peak_bytes"] / 2**20, length,
    )  # fmt: skip
    return {
        "status": "measured",
        "profile": profile.name,
        "device_kind": kind,
        "device": device.get("device", ""),
        "driver": device.get("driver", ""),
        "method": device.get("method", ""),
        "runtime": worst.get("runtime", {}),
        "protocol": f"prompt of max_length - {DECODE_TOKENS} tokens, greedy decode to max_length",
        "max_length": length,
        "prompt_tokens": worst["prompt_tokens"],
        "final_length": worst["final_length"],
        "probes_bytes": {
            "context": context["peak_bytes"],
            "load_peak": worst["load_peak_bytes"],
            "after_prefill": worst["after_prefill_bytes"],
            "run_peak": worst["run_peak_bytes"],
            "worst_case_peak": worst["peak_bytes"],
        },
        "model_dependent_bytes": worst["peak_bytes"] - context["peak_bytes"],
        "prefill_seconds": worst.get("prefill_seconds"),
        "measured_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def not_measured(profile: DeviceProfile, reason: str) -> dict[str, Any]:
    """The report of a package whose device is not on this machine: no numbers, the reason."""
    return {
        "status": "not measured",
        "profile": profile.name,
        "device_kind": profile.device.value,
        "reason": reason,
    }


def compare(measured: dict[str, Any], estimate: dict[str, Any]) -> dict[str, Any]:
    """Estimate beside measurement: ratio, and whether the estimate covers the worst case."""
    if measured.get("status") != "measured":
        return {"status": measured.get("status", "not measured")}
    peak = int(measured["probes_bytes"]["worst_case_peak"])
    total = int(estimate["estimate_bytes"])
    return {
        "status": "measured",
        "estimate_bytes": total,
        "measured_peak_bytes": peak,
        "estimate_over_measured": round(total / peak, 4),
        "estimate_covers_measured": total >= peak,
    }


def measure_or_explain(onnx_dir: Path, profile: DeviceProfile) -> dict[str, Any]:
    """The build's measurement: measured when the profile's device is here, else why not."""
    kind = profile.device.value
    if profile.exporter != GENAI_EXPORTER or not (onnx_dir / "genai_config.json").is_file():
        return not_measured(
            profile, f"the worst-case probe runs onnxruntime-genai packages; exporter "
            f"{profile.exporter!r} ships another runtime's folder"
        )  # fmt: skip
    if not device_present(kind):
        return not_measured(
            profile, f"no {kind} device on the build machine; run `rslora-deploy budget PACKAGE "
            f"--measure` on {DEVICE_WORDS.get(kind, kind)}"
        )  # fmt: skip
    return measure_package(onnx_dir, profile)


def write_measured(reports: Path, measured: dict[str, Any], estimate: dict[str, Any]) -> Path:
    """Write ``reports/budget.measured.json`` (the measurement plus its comparison)."""
    reports.mkdir(parents=True, exist_ok=True)
    path = reports / MEASURED_REPORT
    body = {**measured, "versus_estimate": compare(measured, estimate)}
    path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    return path
