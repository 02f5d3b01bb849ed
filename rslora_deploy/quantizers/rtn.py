"""Round-to-nearest (RTN) quantization: the calibration-free baseline every report compares to.

Each decoder linear weight is quantized per group with the GPTQ grid (``_rtn_math``) and written
as a standard GPTQ v1 checkpoint, so the same loaders (transformers via gptqmodel kernels, the
onnxruntime-genai builder) read it exactly as they read a GPTQ checkpoint. RTN is GPTQ without
the Hessian-based error compensation (Frantar et al., arXiv 2210.17323): the gap between the two
is what calibration buys.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from rslora_deploy._fsutil import write_json
from rslora_deploy.errors import NonFiniteError
from rslora_deploy.quantizers import checkpoint, rtn_math
from rslora_deploy.quantizers.base import QuantizeExtras

if TYPE_CHECKING:
    from rslora_deploy.config import QuantizeConfig
    from rslora_deploy.data.calibration import CalibrationSet

logger = logging.getLogger(__name__)

QUANTIZER_TAG = "rslora-deploy:rtn"


class RTNQuantizer:
    """Round-to-nearest into GPTQ v1 tensors (no calibration)."""

    name: ClassVar[str] = "rtn"
    needs_calibration: ClassVar[bool] = False
    supported_bits: ClassVar[tuple[int, ...]] = rtn_math.SUPPORTED_BITS
    packs_output_features: ClassVar[bool] = False
    compute_dtypes: ClassVar[tuple[str, ...]] = ("bfloat16", "float16", "float32")
    unsupported_model_types: ClassVar[Mapping[str, str]] = {}

    def quantize(
        self,
        model_dir: Path,
        out_dir: Path,
        cfg: QuantizeConfig,
        calib: CalibrationSet | None,
        extras: QuantizeExtras,
    ) -> dict[str, Any]:
        """Quantize every decoder linear of ``model_dir`` and save a GPTQ checkpoint."""
        from safetensors.numpy import save_file

        tensors = checkpoint.load_tensors(model_dir)
        max_err = 0.0
        quantized = 0
        for spec in checkpoint.decoder_linears(model_dir):
            override = checkpoint.module_overrides(spec.name, extras.dynamic)
            if override is None:
                continue
            bits = int(override.get("bits", cfg.bits))
            group = int(override.get("group_size", cfg.group_size))
            weight = tensors.pop(f"{spec.name}.weight")
            if not np.isfinite(weight).all():
                raise NonFiniteError(
                    f"weight of {spec.name} contains NaN/Inf; fix the merged model (re-run the "
                    "merge, check the adapter) before quantizing"
                )
            gq = rtn_math.quantize_rtn(weight, bits, group, bool(cfg.sym))
            packed = rtn_math.pack_gptq(gq)
            tensors[f"{spec.name}.qweight"] = packed.qweight
            tensors[f"{spec.name}.qzeros"] = packed.qzeros
            tensors[f"{spec.name}.scales"] = packed.scales
            tensors[f"{spec.name}.g_idx"] = packed.g_idx
            rel = float(np.linalg.norm(rtn_math.dequantize(gq) - weight)) / max(
                float(np.linalg.norm(weight)), 1e-30
            )
            max_err = max(max_err, rel)
            logger.debug("rtn %s bits=%d group=%d rel_err=%.4g", spec.name, bits, group, rel)
            quantized += 1
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        write_gptq_config(model_dir, out_dir, cfg, extras, QUANTIZER_TAG, {"method": "rtn"})
        checkpoint.copy_extras(model_dir, out_dir)
        return {"layers_quantized": quantized, "max_relative_weight_error": max_err}


def write_gptq_config(
    model_dir: Path,
    out_dir: Path,
    cfg: QuantizeConfig,
    extras: QuantizeExtras,
    quantizer: str,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Write ``config.json`` with a GPTQ v1 ``quantization_config`` and ``quantize_config.json``.

    The fields are the ones AutoGPTQ and gptqmodel write, so both and transformers recognise it.
    """
    qcfg: dict[str, Any] = {
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "desc_act": False,
        "sym": cfg.sym,
        "lm_head": False,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "format": "gptq",
        "method": "gptq",
        "pack_dtype": "int32",
        "true_sequential": True,
        "damp_percent": cfg.damp_percent,
        "meta": {"quantizer": [quantizer], **meta},
    }
    if extras.dynamic:
        qcfg["dynamic"] = extras.dynamic
    config = checkpoint.read_config(model_dir)
    config["quantization_config"] = qcfg
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "quantize_config.json", qcfg)
    return qcfg
