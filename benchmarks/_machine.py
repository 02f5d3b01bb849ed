"""Describe the machine a benchmark ran on (CPU model, cores, memory, library versions)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path


def describe() -> str:
    """One markdown line naming CPU, cores, RAM, Python and key library versions."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with Path("/proc/cpuinfo").open(encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import psutil

    mem = psutil.virtual_memory().total / 2**30
    versions = []
    for pkg in ("torch", "transformers", "gptqmodel", "onnxruntime", "onnxruntime-genai", "peft"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            continue
    return (
        f"{cpu}, {os.cpu_count()} logical cores, {mem:.0f} GiB RAM, Python "
        f"{platform.python_version()}, {', '.join(versions)}"
    )
