"""Device backend: the one place that knows about CUDA, Ascend NPU and CPU.

Selection order: CUDA when ``torch.cuda.is_available()``; else Ascend NPU when ``torch_npu`` is
installed *and* imports *and* ``torch.npu.is_available()``; else CPU. ``torch_npu`` is never a
dependency: it is found with ``importlib.util.find_spec`` and imported under a guard that catches
``ImportError`` and ``RuntimeError``, because without the CANN libraries it fails at import
(stack-notes: ``RuntimeError: Failed to load the backend extension: torch_npu``).

The rest of the code asks this module for a :class:`Backend` and calls its methods; it never tests
a device name itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

logger = logging.getLogger(__name__)

#: Environment variable forcing a device kind (``cuda``, ``npu``, ``cpu``) for tests and debugging.
ENV_DEVICE = "RSLORA_DEPLOY_DEVICE"


@dataclass(frozen=True)
class Backend:
    """A compute device and its memory and synchronisation hooks.

    Attributes:
        kind: ``cuda``, ``npu`` or ``cpu``.
        device: the torch device string (``cuda:0``, ``npu:0``, ``cpu``).
    """

    kind: str
    device: str

    def _module(self) -> Any:
        import torch

        return getattr(torch, self.kind) if self.kind in ("cuda", "npu") else None

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on CPU), so timings are honest."""
        module = self._module()
        if module is not None:
            module.synchronize()

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window on the accelerator (a no-op on CPU)."""
        module = self._module()
        if module is not None:
            module.reset_peak_memory_stats()

    def peak_memory_bytes(self) -> int:
        """Peak accelerator memory allocated by torch, or the process's peak RSS on CPU."""
        module = self._module()
        if module is not None:
            return int(module.max_memory_allocated())
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, never below the current RSS.

    ``ru_maxrss`` is the kernel's high-water mark, which it folds in from per-thread counters
    lazily: right after an allocation it can read a few MB below the current RSS (seen in CI),
    so the larger of the two is returned.
    """
    try:
        import resource

        # Linux reports kilobytes, macOS bytes.
        scale = 1 if os.uname().sysname == "Darwin" else 1024
        high_water = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
    except (ImportError, AttributeError):
        high_water = 0
    return max(high_water, current_rss_bytes())


def current_rss_bytes() -> int:
    """Current resident set size of this process (psutil)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def npu_available() -> bool:
    """True when torch_npu is installed, imports cleanly and sees a device."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        importlib.import_module("torch_npu")
    except (ImportError, RuntimeError) as exc:
        logger.info("torch_npu is installed but cannot be imported (%s); not using the NPU", exc)
        return False
    import torch

    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


def cuda_available() -> bool:
    """True when torch sees a CUDA device."""
    import torch

    return bool(torch.cuda.is_available())


@lru_cache(maxsize=1)
def select_backend() -> Backend:
    """The device to calibrate and evaluate on: CUDA, else Ascend NPU, else CPU.

    ``RSLORA_DEPLOY_DEVICE=cpu`` forces the CPU (and ``cuda``/``npu`` insist on that device).

    Raises:
        ValueError: the forced device is unknown or not available.
    """
    forced = os.environ.get(ENV_DEVICE, "").strip().lower()
    if forced:
        checks = {"cuda": cuda_available, "npu": npu_available, "cpu": lambda: True}
        if forced not in checks:
            raise ValueError(f"{ENV_DEVICE}={forced!r}; use cuda, npu or cpu")
        if not checks[forced]():
            raise ValueError(f"{ENV_DEVICE}={forced} but no such device is available")
        backend = Backend(forced, "cpu" if forced == "cpu" else f"{forced}:0")
    elif cuda_available():
        backend = Backend("cuda", "cuda:0")
    elif npu_available():
        backend = Backend("npu", "npu:0")
    else:
        backend = Backend("cpu", "cpu")
    logger.info("compute backend: %s", backend.device)
    return backend
