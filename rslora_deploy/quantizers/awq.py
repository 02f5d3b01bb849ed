"""AWQ on gptqmodel 7.6.0.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
arXiv 2306.00978.

AWQ protects the weight channels that meet large activations: for each group of linears sharing
an input it searches a per-input-channel scale ``s = mean|x|^alpha`` (``alpha`` in [0, 1] on a
grid) minimising ``||W X - Q(W diag(s)) diag(s)^-1 X||``, folds ``s^-1`` into the preceding
operator (RMSNorm or linear), then quantizes with round-to-nearest per group; a clipping search
then shrinks each group's range. The checkpoint is the AutoAWQ "GEMM" format
(``quant_method: awq``, ``version: gemm``; qweight ``[in, out*bits/32]``).

CPU notes (stack-notes): gptqmodel's AWQ needs ``backend=BACKEND.AWQ_TORCH`` (its auto backend
asks for CUDA) and a bf16/fp16 model; it refuses group sizes that do not divide the width.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rslora_deploy.quantizers import gptqmodel_engine
from rslora_deploy.quantizers.base import QuantizeExtras

if TYPE_CHECKING:
    from rslora_deploy.config import QuantizeConfig
    from rslora_deploy.data.calibration import CalibrationSet

logger = logging.getLogger(__name__)


def awq_config(cfg: QuantizeConfig, extras: QuantizeExtras) -> Any:
    """The gptqmodel AWQ config for our config (GEMM format, lm_head never quantized)."""
    gptqmodel_engine.prepare_env()
    from gptqmodel import QuantizeConfig as EngineConfig

    return EngineConfig(
        bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, method="awq", format="gemm",
        lm_head=False, dynamic=extras.dynamic,
    )  # fmt: skip


class AWQQuantizer:
    """AWQ through gptqmodel, saved in the AutoAWQ GEMM format."""

    name: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True
    supported_bits: ClassVar[tuple[int, ...]] = (4,)
    packs_output_features: ClassVar[bool] = True
    #: gptqmodel's AWQ scale search runs in half precision only.
    compute_dtypes: ClassVar[tuple[str, ...]] = ("bfloat16", "float16")
    #: Measured on gptqmodel 7.6.0 + transformers 5.24 (docs/benchmarks-quantize.md, Gemma-3):
    #: its AWQ calls Gemma3RotaryEmbedding without ``layer_type`` (TypeError 8 s in), and its
    #: Gemma-3 layout folds MLP scales into the wrong norm, so even a patched call would be wrong.
    #: Phi-3 (issue #18, tiny model): its packer raises ``KeyError: 'q_zeros'`` on the fused
    #: gate_up_proj after the whole scale search; GLM/GLM-4 have the same fused module and are
    #: refused with it (not run).
    unsupported_model_types: ClassVar[Mapping[str, str]] = {
        **dict.fromkeys(
            ("gemma3", "gemma3_text"),
            "gptqmodel 7.6.0's AWQ fails on Gemma-3's per-layer-type rotary embedding",
        ),
        **dict.fromkeys(
            ("phi3", "glm", "glm4"),
            "gptqmodel 7.6.0's AWQ fails packing the fused mlp.gate_up_proj",
        ),
    }

    def quantize(
        self,
        model_dir: Path,
        out_dir: Path,
        cfg: QuantizeConfig,
        calib: CalibrationSet | None,
        extras: QuantizeExtras,
    ) -> dict[str, Any]:
        """Calibrate, scale-search, quantize and save into ``out_dir``."""
        from gptqmodel import BACKEND

        qcfg = awq_config(cfg, extras)
        return gptqmodel_engine.quantize_and_save(
            self.name, model_dir, out_dir, qcfg, cfg, calib, backend=BACKEND.AWQ_TORCH
        )
