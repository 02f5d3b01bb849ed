"""Shared reading of PEFT adapter directories (``adapter_config.json`` + weights).

Weights come from ``adapter_model.safetensors``; the legacy ``adapter_model.bin`` is read only with
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from rslora_deploy.adapters.st_io import SafetensorsFile
from rslora_deploy.errors import AdapterFormatError, UnsupportedError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def read_config(directory: Path) -> dict[str, Any]:
    """Parse ``adapter_config.json`` (E001 when it is not a JSON object)."""
    path = Path(directory) / CONFIG_NAME
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterFormatError(f"{path} is not valid JSON ({exc}); fix or re-save the adapter",
                                 code="E001") from None
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object", code="E001")
    return cfg


def read_weights(directory: Path) -> tuple[dict[str, np.ndarray], Path]:
    """All adapter tensors as float32 numpy arrays (upcast per spec 6.1), and the file read."""
    directory = Path(directory)
    st_path = directory / SAFETENSORS_NAME
    if st_path.is_file():
        handle = SafetensorsFile(st_path)
        return {name: handle.numpy(name).astype(np.float32) for name in handle.keys()}, st_path
    bin_path = directory / BIN_NAME
    if bin_path.is_file():
        return _read_bin(bin_path), bin_path
    raise AdapterFormatError(
        f"{directory}: no {SAFETENSORS_NAME} (or legacy {BIN_NAME}) next to {CONFIG_NAME}",
        code="E023")


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    import pickle

    import torch

    try:
        # weights_only=True: only tensors and plain containers, never arbitrary objects.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise AdapterFormatError(
            f"{path} could not be loaded safely with torch.load(weights_only=True) "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); re-save "
            "the adapter as safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterFormatError(f"{path} does not hold a flat dict of tensors", code="E023")
    return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def strip_prefix(key: str, path: Path) -> str:
    """Remove ``base_model.model.`` (every PEFT key has it)."""
    if not key.startswith(PREFIX):
        raise AdapterFormatError(f"{path}: unexpected tensor {key!r}: PEFT keys start with "
                                 f"{PREFIX!r}", code="E023")
    return key[len(PREFIX):]


def pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """Per-module override: first key with ``re.match(rf"(.*\\.)?({key})$", module)`` wins.

    This is PEFT's ``rank_pattern``/``alpha_pattern`` rule (spec 6.1), in dict order.
    """
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def reject_unsupported(cfg: dict[str, Any], path: Path) -> None:
    """E070 for PEFT features whose merge is not W + s*B*A (spec 6.1 rejections)."""
    checks = [
        ("use_dora", bool(cfg.get("use_dora")), "DoRA re-normalises W; its merge is not W + BA"),
        ("lora_bias", bool(cfg.get("lora_bias")), "a trained bias is not supported"),
        ("modules_to_save", bool(cfg.get("modules_to_save")),
         "full module overrides are not supported"),
        ("trainable_token_indices", bool(cfg.get("trainable_token_indices")),
         "trainable tokens are not supported"),
        ("layer_replication", bool(cfg.get("layer_replication")),
         "layer replication changes the architecture"),
        ("megatron_config", bool(cfg.get("megatron_config")), "Megatron layers are not supported"),
    ]
    for field_name, bad, why in checks:
        if bad:
            raise UnsupportedError(
                f"{path}: {field_name}={cfg.get(field_name)!r} is an unsupported PEFT feature "
                f"({why}); retrain without it", code="E070")
