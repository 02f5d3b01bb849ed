"""GPTQ on gptqmodel 7.6.0.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv 2210.17323.

For each linear layer with calibration inputs ``X`` GPTQ minimises ``||W X - Q(W) X||^2`` column
by column: with the damped Hessian ``H = 2 X X^T + lambda * mean(diag H) * I`` (``lambda`` =
``damp_percent``), each quantized column's error is spread over the not-yet-quantized columns by
``W[:, j:] -= (w_j - q_j) / [H^-1]_jj * [H^-1]_{j, j:}``. ``desc_act`` processes columns by
decreasing ``diag H``. The checkpoint is the GPTQ v1 format (``checkpoint_format: gptq``).
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


def gptq_config(cfg: QuantizeConfig, extras: QuantizeExtras) -> Any:
    """The gptqmodel ``QuantizeConfig`` for our config (lm_head never quantized)."""
    gptqmodel_engine.prepare_env()
    from gptqmodel import QuantizeConfig as EngineConfig

    kwargs: dict[str, Any] = {
        "bits": cfg.bits, "group_size": cfg.group_size, "desc_act": cfg.desc_act,
        "sym": cfg.sym, "damp_percent": cfg.damp_percent, "true_sequential": extras.true_sequential,
        "mse": cfg.mse, "lm_head": False, "dynamic": extras.dynamic,
    }  # fmt: skip
    if extras.offload_to_disk is not None:
        kwargs["offload_to_disk"] = extras.offload_to_disk
    if extras.act_group_aware is not None:
        kwargs["act_group_aware"] = extras.act_group_aware
    elif cfg.desc_act:
        # gptqmodel turns on group-aware reordering by default and refuses it with desc_act.
        kwargs["act_group_aware"] = False
    return EngineConfig(**kwargs)


class GPTQQuantizer:
    """GPTQ through gptqmodel, saved as a GPTQ v1 checkpoint."""

    name: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True
    supported_bits: ClassVar[tuple[int, ...]] = (4, 8)
    packs_output_features: ClassVar[bool] = False
    compute_dtypes: ClassVar[tuple[str, ...]] = ("bfloat16", "float16", "float32")
    #: Measured on gptqmodel 7.6.0 + transformers 5.24 (tiny Phi-3 and GLM, issue #18): its
    #: model definitions quantize gate_proj/up_proj, which these architectures do not have, and
    #: save a split, unquantized MLP that no longer fits the HF model (our checkpoint check
    #: stops it after the whole calibration run); refused before any work instead.
    unsupported_model_types: ClassVar[Mapping[str, str]] = dict.fromkeys(
        ("phi3", "glm", "glm4"),
        "gptqmodel 7.6.0 writes its fused mlp.gate_up_proj as split, unquantized gate_proj/up_proj",
    )

    def quantize(
        self,
        model_dir: Path,
        out_dir: Path,
        cfg: QuantizeConfig,
        calib: CalibrationSet | None,
        extras: QuantizeExtras,
    ) -> dict[str, Any]:
        """Calibrate, quantize and save into ``out_dir``."""
        qcfg = gptq_config(cfg, extras)
        return gptqmodel_engine.quantize_and_save(self.name, model_dir, out_dir, qcfg, cfg, calib)
