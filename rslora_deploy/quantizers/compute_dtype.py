"""Which dtype calibration runs in when ``quantize.compute_dtype = "auto"``.

bf16 calibration is only fast where the CPU multiplies bf16 natively. Measured on this project's
machines (a [2048, 576] x [576, 1536] matmul, torch 2.13 CPU, 2 threads):

    AVX2 only (AMD EPYC VM, no avx512_bf16):   fp32 50 ms, bf16 3,138 ms (63x slower)
    GPTQ of SmolLM2-135M + demo adapter there: fp32 181 s, bf16 499 s

while on a CPU with avx512_bf16 the same GPTQ went from 155 s (fp32) to 98 s (bf16) with no
visible loss change (stack-notes). So "auto" takes bf16 where the CPU has it (x86 ``avx512_bf16``
or ``amx_bf16``, Arm ``bf16``) or where the method runs in half precision only (AWQ), else fp32.
The resolved dtype is written into the config (and so into the stage-cache key and the
manifest): two machines that resolve differently produce, and say they produce, different bytes.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

#: /proc/cpuinfo flags of a CPU with native bf16 matrix arithmetic (x86 and Arm spellings).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags (x86 ``flags``, Arm ``Features``); empty when unreadable."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@cache
def native_bf16() -> bool:
    """Whether this machine's CPU multiplies bf16 natively (read once per process)."""
    return bool(cpu_flags() & BF16_FLAGS)


def resolve_compute_dtype(requested: str, allowed: tuple[str, ...], bf16_fast: bool) -> str:
    """``requested`` itself, or for ``"auto"`` the fastest dtype of ``allowed`` on this CPU."""
    if requested != "auto":
        return requested
    if bf16_fast or "float32" not in allowed:
        return "bfloat16"
    return "float32"
