"""``--protect-adapter``: keep the modules where quantization would erase the adapter at 8 bits.

For each decoder linear, compare the adapter's delta with the int4 quantization step of that
module (``delta_to_step_ratios``: rms(ΔW) / step). Where the ratio is below
``protect_ratio`` the delta is smaller than the rounding noise and int4 would wipe it out; those
modules are written with 8 bits through gptqmodel's per-module ``dynamic`` config. The byte cost
is computed and reported (docs/quantization.md, "Adapter survival").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    # Annotation only: config imports the quantizer registry to check a method's name, so a
    # runtime import back would close the config <-> quantizers cycle.
    from rslora_deploy.config import QuantizeConfig

logger = logging.getLogger(__name__)

#: Module leaf names an exporter fuses into one node, e.g. ``(("q_proj", "k_proj", "v_proj"),)``.
FusedGroups = Sequence[Sequence[str]]

#: Modules with rms(ΔW) / quantization step below this are protected by --protect-adapter.
#: Measured on the demo adapter (4-bit g64; benchmarks/results/survival.json): ratios span
#: 0.06-0.97, so 1.0 keeps all 210 modules at 8 bits (+53.9 MB, domain perplexity 27.27 vs
#: merged 27.22); 0.15 keeps 62 (+18.0 MB, 39.42 -> 32.41). 0.15 is the default trade-off.
DEFAULT_PROTECT_RATIO = 0.15


def plan_protection(
    base_dir: Path,
    merged_dir: Path,
    cfg: QuantizeConfig,
    ratio: float,
    fused_groups: FusedGroups,
) -> tuple[Any, dict[str, Any]]:
    """Quantizer extras keeping low-ratio modules at 8 bits, and the report of what it costs.

    ``fused_groups`` are the module groups the exporter fuses into one node
    (``Exporter.fused_groups``), passed in by the caller: quantizers/ never imports exporters/.
    """
    from rslora_deploy.quantizers.base import QuantizeExtras
    from rslora_deploy.quantizers.checkpoint import decoder_linears

    ratios = delta_to_step_ratios(base_dir, merged_dir, cfg.bits, cfg.group_size, bool(cfg.sym))
    modules = protected_modules(ratios, fused_groups, ratio)
    cost = protection_cost_bytes(decoder_linears(merged_dir), modules, cfg.bits, cfg.group_size)
    logger.info("protect-adapter: %d modules kept at 8 bits (+%.1f MB)", len(modules), cost / 1e6)
    info = {
        "modules": len(modules),
        "max_ratio": ratio,
        "extra_bytes": cost,
        "changed_modules": len(ratios),
    }
    dynamic = protection_dynamic(ratios, fused_groups, ratio)
    return QuantizeExtras(dynamic=dynamic or None), info


def delta_to_step_ratios(
    base_dir: Path, merged_dir: Path, bits: int, group_size: int, sym: bool
) -> dict[str, dict[str, float]]:
    """``rms(ΔW) / mean quantization step`` for every decoder linear whose weight changed.

    The step is the RTN group scale of the merged weight at ``bits``/``group_size``.
    """
    from rslora_deploy.quantizers import checkpoint, rtn_math

    base = checkpoint.load_tensors(base_dir)
    merged = checkpoint.load_tensors(merged_dir)
    out: dict[str, dict[str, float]] = {}
    for spec in checkpoint.decoder_linears(merged_dir):
        key = f"{spec.name}.weight"
        delta = merged[key].astype(np.float64) - base[key].astype(np.float64)
        rms = float(np.sqrt(np.mean(delta * delta)))
        if rms == 0:
            continue
        gq = rtn_math.quantize_rtn(merged[key], bits, group_size, sym)
        step = float(gq.scales.astype(np.float64).mean())
        out[spec.name] = {"delta_rms": rms, "step": step, "ratio": rms / step}
    return out


def protected_modules(
    ratios: dict[str, dict[str, float]],
    fused_groups: FusedGroups,
    max_ratio: float = DEFAULT_PROTECT_RATIO,
) -> list[str]:
    """Modules with ``ratio < max_ratio``, widened to their fused siblings.

    Modules the exporter fuses into one MatMul (``fused_groups``, e.g. q/k/v and gate/up) must
    share their precision, so protecting one protects its group.
    """
    chosen = {name for name, r in ratios.items() if r["ratio"] < max_ratio}
    for name in list(chosen):
        prefix, _, leaf = name.rpartition(".")
        for group in fused_groups:
            if leaf in group:
                chosen.update(f"{prefix}.{sib}" for sib in group)
    return sorted(chosen)


def protection_dynamic(
    ratios: dict[str, dict[str, float]],
    fused_groups: FusedGroups,
    max_ratio: float = DEFAULT_PROTECT_RATIO,
    bits: int = 8,
) -> dict[str, dict[str, Any]]:
    """The gptqmodel ``dynamic`` overrides keeping :func:`protected_modules` at ``bits``.

    The pattern is the exact module name, anchored, so nothing else matches.
    """
    return {
        f"+:^{name.replace('.', chr(92) + '.')}$": {"bits": bits}
        for name in protected_modules(ratios, fused_groups, max_ratio)
    }


def gptq_layer_bytes(in_features: int, out_features: int, bits: int, group_size: int) -> int:
    """Bytes of one GPTQ layer: qweight + qzeros (``bits`` each) + fp16 scales + int32 g_idx."""
    groups = in_features // (in_features if group_size == -1 else group_size)
    return (
        in_features * out_features * bits // 8
        + groups * out_features * bits // 8
        + groups * out_features * 2
        + in_features * 4
    )


def protection_cost_bytes(
    linears: list[Any], modules: list[str], bits: int, group_size: int, protect_bits: int = 8
) -> int:
    """Extra bytes of keeping ``modules`` at ``protect_bits`` instead of ``bits``."""
    wanted = set(modules)
    return sum(
        gptq_layer_bytes(s.in_features, s.out_features, protect_bits, group_size)
        - gptq_layer_bytes(s.in_features, s.out_features, bits, group_size)
        for s in linears
        if s.name in wanted
    )


def quantized_weight_bytes(model_dir: Path) -> int:
    """Bytes of the quantized tensors (qweight, qzeros, scales, g_idx) of a checkpoint."""
    from rslora_deploy.quantizers.checkpoint import tensor_shapes

    sizes = {"I32": 4, "F16": 2, "BF16": 2, "F32": 4, "I8": 1, "U8": 1}
    total = 0
    for key, (shape, dtype) in tensor_shapes(model_dir).items():
        if key.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"):
            total += int(np.prod(shape)) * sizes.get(dtype, 4)
    return total
