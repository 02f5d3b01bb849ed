"""Device profiles for tests and benchmarks that need an onnxruntime-genai CPU-target export."""

from __future__ import annotations

from rslora_deploy.profiles import DeviceProfile, ExportTarget, load_profile


def genai_cpu_profile() -> DeviceProfile:
    """A profile whose exporter is onnxruntime-genai with a CPU target (fp32 activations).

    ``cpu-2gb`` when this checkout ships it; otherwise ``t4-2gb`` with its target switched to
    CPU (the Ascend profiles export through ``ascend-om`` since the exporter registry landed).
    """
    from rslora_deploy.errors import RsloraDeployError

    try:
        return load_profile("cpu-2gb")
    except RsloraDeployError:
        base = load_profile("t4-2gb")
        return base.model_copy(update={"name": "t4-2gb-cpu", "export_target": ExportTarget.CPU})
