"""``quantize.compute_dtype = "auto"``: bf16 only where the CPU has it or the method needs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from rslora_deploy.config import QuantizeConfig
from rslora_deploy.quantizers import compute_dtype
from rslora_deploy.quantizers.compute_dtype import cpu_flags, resolve_compute_dtype

GPTQ = ("bfloat16", "float16", "float32")
AWQ = ("bfloat16", "float16")


@pytest.mark.parametrize(
    ("requested", "allowed", "bf16_fast", "expected"),
    [
        ("auto", GPTQ, False, "float32"),  # AVX2-only CPU: bf16 is emulated, 2.8x slower GPTQ
        ("auto", GPTQ, True, "bfloat16"),
        ("auto", AWQ, False, "bfloat16"),  # half precision only
        ("float16", GPTQ, True, "float16"),  # an explicit choice is kept
    ],
)
def test_resolve(requested: str, allowed: tuple[str, ...], bf16_fast: bool, expected: str) -> None:
    assert resolve_compute_dtype(requested, allowed, bf16_fast) == expected


@pytest.mark.parametrize(
    ("line", "has_bf16"),
    [
        ("flags\t\t: fpu sse2 fma avx avx2\n", False),
        ("flags\t\t: fpu avx2 avx512f avx512_bf16\n", True),
        ("Features\t: fp asimd bf16 i8mm\n", True),  # aarch64 spelling
    ],
)
def test_cpu_flags_read_both_spellings(tmp_path: Path, line: str, has_bf16: bool) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\n" + line)
    assert bool(cpu_flags(info) & compute_dtype.BF16_FLAGS) is has_bf16
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_config_resolves_auto_into_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """The resolved dtype is what the config (cache key, manifest) holds, never "auto"."""
    monkeypatch.setattr(compute_dtype, "native_bf16", lambda: False)
    assert QuantizeConfig().compute_dtype == "float32"
    assert QuantizeConfig(method="awq").compute_dtype == "bfloat16"
    monkeypatch.setattr(compute_dtype, "native_bf16", lambda: True)
    assert QuantizeConfig().compute_dtype == "bfloat16"
