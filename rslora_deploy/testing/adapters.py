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
