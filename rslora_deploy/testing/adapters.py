"""Helpers to build adapter checkpoints in tests (RS-LoRA v1 and PEFT-shaped directories)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file


def fake_base_model() -> dict[str, str]:
    """A ``base_model`` block for checkpoints whose base hashes are never checked."""
    return {
        "name_or_path": "none",
        "revision": "",
        "architecture": "none",
        "config_sha256": "0" * 64,
        "target_weights_sha256": "0" * 64,
    }


def f32(x: Any) -> np.ndarray:
    """``np.asarray(x, float32)``."""
    return np.asarray(x, dtype=np.float32)


def write_peft_dir(directory: Path, cfg: dict[str, Any], tensors: dict[str, Any]) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (float32 tensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: f32(v) for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
    return directory


def random_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    kind: str,
    *,
    r: int,
    targets: list[str],
    seed: int = 0,
    std: float = 0.02,
) -> Path:
    """A PEFT ``lora`` or ``vera`` adapter for ``base_dir`` with random trained-looking weights.

    PEFT initialises the factor that would make the delta nonzero to zeros (LoRA's B, VeRA's
    lambda_b), so a freshly made adapter changes nothing; here every trainable tensor is drawn
    from N(0, std) with ``seed`` instead, so the adapter visibly changes the model's output.
    Saved by PEFT itself (safetensors), as a user's trained adapter would be.
    """
    import torch
    from peft import LoraConfig, VeraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if kind == "lora":
        config: Any = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)
    elif kind == "vera":
        config = VeraConfig(r=r, target_modules=targets, save_projection=True)
    else:
        raise ValueError(f"kind must be lora or vera, not {kind!r}")
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)
