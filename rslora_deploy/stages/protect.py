"""``--protect-adapter``: keep the modules where quantization would erase the adapter at 8 bits.

For each decoder linear, compare the adapter's delta with the int4 quantization step of that
module (``survival.delta_to_step_ratios``: rms(ΔW) / step). Where the ratio is below
``protect_ratio`` the delta is smaller than the rounding noise and int4 would wipe it out; those
modules are written with 8 bits through gptqmodel's per-module ``dynamic`` config. The byte cost
is computed and reported (docs/quantization.md, "Adapter survival").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rslora_deploy.config import QuantizeConfig

logger = logging.getLogger(__name__)


def plan_protection(
    base_dir: Path, merged_dir: Path, cfg: QuantizeConfig, ratio: float
) -> tuple[Any, dict[str, Any]]:
    """Quantizer extras keeping low-ratio modules at 8 bits, and the report of what it costs."""
    from rslora_deploy import survival
    from rslora_deploy.quantizers._checkpoint import decoder_linears
    from rslora_deploy.quantizers.base import QuantizeExtras

    ratios = survival.delta_to_step_ratios(base_dir, merged_dir, cfg.bits, cfg.group_size, cfg.sym)
    modules = survival.protected_modules(ratios, ratio)
    cost = survival.protection_cost_bytes(
        decoder_linears(merged_dir), modules, cfg.bits, cfg.group_size
    )
    logger.info("protect-adapter: %d modules kept at 8 bits (+%.1f MB)", len(modules), cost / 1e6)
    info = {
        "modules": len(modules),
        "max_ratio": ratio,
        "extra_bytes": cost,
        "changed_modules": len(ratios),
    }
    return QuantizeExtras(dynamic=survival.protection_dynamic(ratios, ratio) or None), info
