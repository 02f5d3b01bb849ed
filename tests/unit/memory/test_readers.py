"""Memory readers and the peak sampler; the CUDA (NVML) logic runs on CPU against a fake pynvml."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rslora_deploy.memory.readers import CpuReader, NpuReader, NvmlReader, PeakSampler


class FakeNvml:
    """The five pynvml calls NvmlReader makes; ``used`` is set by the test as the 'GPU' fills."""

    def __init__(self, used: int) -> None:
        self.used = used
        self.initialised = False

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        self.initialised = True

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:  # noqa: N802
        return f"gpu{index}"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:  # noqa: N802
        return SimpleNamespace(used=self.used, total=80 * 2**30, free=80 * 2**30 - self.used)

    def nvmlDeviceGetName(self, handle: str) -> bytes:  # noqa: N802
        return b"Fake GPU"

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        return "580.00"


def test_nvml_peak_minus_baseline_catches_a_short_spike() -> None:
    """A prefill spike shorter than the whole run is caught by sampling, not by a final read."""
    nvml = FakeNvml(used=500 * 2**20)  # other processes already hold 500 MiB
    reader = NvmlReader(0, nvml=nvml)
    assert nvml.initialised
    with PeakSampler(reader, period=0.001) as sampler:
        nvml.used = 900 * 2**20  # context + weights
        time.sleep(0.05)
        nvml.used = 1500 * 2**20  # prefill spike
        time.sleep(0.05)
        nvml.used = 1000 * 2**20  # decode
        time.sleep(0.02)
    assert sampler.baseline_bytes == 500 * 2**20
    assert sampler.added_bytes == 1000 * 2**20  # 1500 - 500, although the run ended at 1000
    assert sampler.samples > 10
    assert reader.describe() == {
        "device": "Fake GPU",
        "driver": "580.00",
        "method": reader.describe()["method"],
    }
    assert "NVML" in reader.describe()["method"]


def test_npu_reader_is_total_minus_free() -> None:
    npu = SimpleNamespace(
        mem_get_info=lambda index: (6 * 2**30, 8 * 2**30), get_device_name=lambda i: "Ascend310P3"
    )
    reader = NpuReader(0, npu=npu)
    assert reader.used_bytes() == 2 * 2**30
    assert reader.describe()["device"] == "Ascend310P3"


def test_cpu_reader_sees_an_allocation() -> None:
    reader = CpuReader()
    before = reader.peak_bytes()
    block = bytearray(64 * 2**20)  # touched: zero-filled pages are resident
    for i in range(0, len(block), 4096):
        block[i] = 1
    assert reader.peak_bytes() >= before
    assert reader.used_bytes() > 64 * 2**20
    del block


def test_worst_probe_cuda_logic_on_cpu(tiny_onnx_cpu: Path) -> None:
    """The probe's device path (baseline, sampled peak, subtraction) with the real runtime on CPU:
    the fake NVML 'device' reports this process's RSS plus what other processes hold."""
    from rslora_deploy.memory.probe import worst_probe

    class RssAsGpu:
        kind = "cuda"

        def used_bytes(self) -> int:
            return 300 * 2**20 + CpuReader().used_bytes()

        def describe(self) -> dict[str, str]:
            return {"device": "fake", "driver": "", "method": "rss"}

    result = worst_probe("cuda", str(tiny_onnx_cpu), 64, reader=RssAsGpu())
    assert result["prompt_tokens"] == 48
    assert result["final_length"] == 64
    assert 0 < result["load_peak_bytes"] <= result["peak_bytes"]
    assert 0 < result["after_prefill_bytes"] <= result["run_peak_bytes"] <= result["peak_bytes"]
    assert result["peak_bytes"] < 300 * 2**20 + CpuReader().peak_bytes()  # baseline subtracted
