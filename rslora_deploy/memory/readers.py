"""Memory readers: one small interface over CPU RSS, NVIDIA NVML and Ascend, plus a peak sampler.

A reader answers "how many bytes are in use now" for one device. The CUDA and Ascend readers read
the whole device (NVML / ``mem_get_info``), so a probe subtracts the reading taken before it
touched the device; the CPU reader reads the process's own RSS. :class:`PeakSampler` polls a reader
every few milliseconds on a thread and keeps the maximum: device allocators free their buffers
between calls, so a single reading at the end would miss the prefill's peak.

Optional backends are imported under guards: ``pynvml`` comes from ``nvidia-ml-py`` (not a
dependency); ``torch_npu`` breaks ``import torch`` itself where the CANN libraries are absent
(stack-notes), so it is located with ``find_spec`` and imported catching ``ImportError`` and
``RuntimeError``.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path
from typing import Any, Protocol

#: Default sampling period: fine enough to catch a prefill (hundreds of ms on the smallest model).
SAMPLE_SECONDS = 0.002


class MemoryReader(Protocol):
    """Bytes in use on one device, and what that device is."""

    kind: str

    def used_bytes(self) -> int:
        """Bytes in use now (the whole device for cuda/npu, this process's RSS for cpu)."""
        ...

    def describe(self) -> dict[str, str]:
        """Device name, driver and runtime versions, and the reading method."""
        ...


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


class CpuReader:
    """This process's resident memory (``/proc/self/status``)."""

    kind = "cpu"

    def used_bytes(self) -> int:
        """Current RSS (VmRSS)."""
        return _status_kib("VmRSS")

    def peak_bytes(self) -> int:
        """Peak RSS of this address space (VmHWM; not ru_maxrss, which survives exec)."""
        return _status_kib("VmHWM")

    def reset_peak(self) -> bool:
        """Start a new VmHWM window (write ``5`` to ``/proc/self/clear_refs``); False if refused."""
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def describe(self) -> dict[str, str]:
        """The CPU model name from ``/proc/cpuinfo``."""
        import platform

        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return {"device": name, "driver": "", "method": "peak RSS (VmHWM) of the child process"}


class NvmlReader:
    """Used memory of one NVIDIA GPU through NVML (``pynvml`` from ``nvidia-ml-py``)."""

    kind = "cuda"

    def __init__(self, index: int = 0, nvml: Any = None) -> None:
        """Open GPU ``index``; ``nvml`` is the pynvml module (tests pass a fake)."""
        self._nvml = nvml if nvml is not None else _import_pynvml()
        self._nvml.nvmlInit()
        self._handle = self._nvml.nvmlDeviceGetHandleByIndex(index)

    def used_bytes(self) -> int:
        """Device memory in use by every process (``nvmlDeviceGetMemoryInfo().used``)."""
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def describe(self) -> dict[str, str]:
        """GPU name, driver and CUDA driver version."""
        name = self._nvml.nvmlDeviceGetName(self._handle)
        driver = self._nvml.nvmlSystemGetDriverVersion()
        return {
            "device": name.decode() if isinstance(name, bytes) else str(name),
            "driver": driver.decode() if isinstance(driver, bytes) else str(driver),
            "method": "NVML device memory used, sampled every few ms, minus the reading "
            "before the probe touched the GPU",
        }


class NpuReader:
    """Used memory of one Ascend NPU through ``torch.npu.mem_get_info`` (torch_npu, guarded)."""

    kind = "npu"

    def __init__(self, index: int = 0, npu: Any = None) -> None:
        """Bind NPU ``index``; ``npu`` is the ``torch.npu`` module (tests pass a fake)."""
        self._npu = npu if npu is not None else _import_torch_npu()
        self._index = index

    def used_bytes(self) -> int:
        """Device memory in use: total minus free."""
        free, total = self._npu.mem_get_info(self._index)
        return int(total) - int(free)

    def describe(self) -> dict[str, str]:
        """NPU name (torch_npu exposes no driver version)."""
        return {
            "device": str(self._npu.get_device_name(self._index)),
            "driver": "",
            "method": "torch.npu.mem_get_info (total - free), sampled every few ms, minus the "
            "reading before the probe touched the NPU",
        }


def _import_pynvml() -> Any:
    from rslora_deploy.errors import MissingDependencyError

    if importlib.util.find_spec("pynvml") is None:
        raise MissingDependencyError(
            "measuring CUDA memory needs NVML bindings; pip install nvidia-ml-py"
        )
    import pynvml

    return pynvml


def _import_torch_npu() -> Any:
    from rslora_deploy.errors import MissingDependencyError

    if importlib.util.find_spec("torch_npu") is None:
        raise MissingDependencyError("measuring Ascend memory needs torch_npu with CANN")
    try:
        import torch
        import torch_npu  # noqa: F401  (registers torch.npu)
    except (ImportError, RuntimeError) as exc:
        raise MissingDependencyError(f"torch_npu is installed but does not load: {exc}") from None
    return torch.npu  # type: ignore[attr-defined]  # registered by torch_npu


def device_present(kind: str) -> bool:
    """Whether a device of ``kind`` (cpu, cuda, npu) can be read on this machine."""
    if kind == "cpu":
        return Path("/proc/self/status").is_file()
    try:
        reader: MemoryReader = NvmlReader() if kind == "cuda" else NpuReader()
        reader.used_bytes()
    except Exception:  # noqa: BLE001 - any failure to open the device means "absent"
        return False
    return True


def open_reader(kind: str) -> MemoryReader:
    """The reader for ``kind``."""
    if kind == "cuda":
        return NvmlReader()
    if kind == "npu":
        return NpuReader()
    return CpuReader()


class PeakSampler:
    """Poll ``reader`` on a daemon thread and keep the maximum reading (use as a context manager).

    ``peak_bytes - baseline_bytes`` is what the code run inside the ``with`` block added at its
    worst, where ``baseline_bytes`` is the reading taken on entry.
    """

    def __init__(self, reader: MemoryReader, period: float = SAMPLE_SECONDS) -> None:
        """Sample ``reader`` every ``period`` seconds."""
        self.reader, self.period = reader, period
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _read(self) -> None:
        value = self.reader.used_bytes()
        self.peak_bytes = max(self.peak_bytes, value)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._read()
            time.sleep(self.period)

    def mark(self) -> int:
        """Take one reading now (between phases) and return the peak so far."""
        self._read()
        return self.peak_bytes

    def __enter__(self) -> PeakSampler:
        """Read the baseline and start sampling."""
        self.baseline_bytes = self.reader.used_bytes()
        self.peak_bytes = self.baseline_bytes
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop sampling after one last reading."""
        self._stop.set()
        self._thread.join()
        self._read()

    @property
    def added_bytes(self) -> int:
        """Peak minus the baseline taken on entry."""
        return self.peak_bytes - self.baseline_bytes
