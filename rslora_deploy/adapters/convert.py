"""Export an RS-LoRA v1 adapter as a plain PEFT LoRA adapter, exactly (spec 6.3).

RS-LoRA's dW = s B~ A~ is already a rank-r product, so no SVD is needed (unlike PEFT's
``lora/conversion.py``): lora_A = A~, lora_B = s B~, r = r, lora_alpha = r (scaling 1, use_rslora
false). The only rounding is of A~ and s B~ to float32. A DoRA adapter (our ``"dora": true``
extension) exports as PEFT DoRA: ``use_dora`` and each module's magnitude as its
``lora_magnitude_vector``; with scaling 1, PEFT's norm of W + lora_B @ lora_A is ours of W + dW.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from rslora_deploy._fsutil import write_json
from rslora_deploy.adapters import rslora_v1
from rslora_deploy.adapters.peft_common import CONFIG_NAME, PREFIX, SAFETENSORS_NAME
from rslora_deploy.errors import InputError, UnsupportedError


def to_peft_lora(adapter_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for the RS-LoRA adapter.

    Raises:
        UnsupportedError: out_slice modules (PEFT cannot target part of a weight) or mixed
            linear/conv1d layouts (PEFT's fan_in_fan_out is one flag for all modules).
        InputError: out_dir exists and is not empty.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} already exists and is not empty; pass a fresh directory")
    ckpt = rslora_v1.read_checkpoint(Path(adapter_dir))
    deltas = rslora_v1.checkpoint_deltas(ckpt)
    layouts = {d.layout for d in deltas if d.layout != "embedding"}
    if len(layouts) > 1:
        raise UnsupportedError(
            f"{adapter_dir}: modules mix layouts {sorted(layouts, key=str)}; PEFT's "
            "fan_in_fan_out applies to all modules, export them separately"
        )
    tensors = {}
    for delta in deltas:
        if delta.out_slice is not None:
            raise UnsupportedError(
                f"{delta.name}: out_slice {list(delta.out_slice)} cannot be expressed in PEFT LoRA "
                "(it targets whole weights); merge with rslora-deploy instead"
            )
        assert delta.A is not None
        assert delta.B is not None
        lora_a = np.ascontiguousarray(delta.A, dtype=np.float32)
        lora_b = np.ascontiguousarray(
            np.asarray(delta.B, np.float64) * delta.scale, dtype=np.float32
        )
        if delta.magnitude is not None:
            magnitude = np.ascontiguousarray(delta.magnitude, dtype=np.float32)
            tensors[f"{PREFIX}{delta.name}.lora_magnitude_vector"] = magnitude
        if delta.layout == "embedding":
            tensors[f"{PREFIX}{delta.name}.lora_embedding_A"] = lora_a
            tensors[f"{PREFIX}{delta.name}.lora_embedding_B"] = lora_b
        else:
            tensors[f"{PREFIX}{delta.name}.lora_A.weight"] = lora_a
            tensors[f"{PREFIX}{delta.name}.lora_B.weight"] = lora_b
    cfg = ckpt.config
    peft_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.r,
        "use_rslora": False,
        "use_dora": cfg.dora,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": layouts == {"conv1d"},
        "target_modules": sorted(d.name for d in deltas),
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": cfg.raw["base_model"]["name_or_path"],
        "inference_mode": True,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / CONFIG_NAME, peft_cfg)
    save_file(tensors, str(out_dir / SAFETENSORS_NAME), metadata={"format": "pt"})
    return {"modules": len(deltas), "r": cfg.r, "out": str(out_dir)}
