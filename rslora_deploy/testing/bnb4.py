"""Tiny bitsandbytes-4-bit-style checkpoints built without bitsandbytes (for tests and examples).

:func:`quantize_blocks` is a plain nearest-code 4-bit quantizer that writes the tensors in the
layout transformers saves a ``load_in_4bit`` model in (see :mod:`rslora_deploy.quantizers.bnb4`);
:func:`write_bnb4_dir` saves a tiny Llama that way. It is a fixture generator, not a QLoRA
quantizer: its double quantization uses a linear 8-bit map, not bitsandbytes' dynamic one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from rslora_deploy.quantizers.bnb4 import STANDARD_MAPS, STATE_PREFIX
from rslora_deploy.testing.tiny import save_tiny, tiny_llama


def _state_tensor(state: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(json.dumps(state).encode(), dtype=np.uint8).copy()


def _double_quantize(absmax: np.ndarray, state: dict[str, Any]) -> dict[str, np.ndarray]:
    """8-bit codes for the block scales, 256 per group, around their mean."""
    offset = float(absmax.mean())
    centred = absmax - np.float32(offset)
    nested_map = np.linspace(-1, 1, 256, dtype=np.float32)
    groups = -(-absmax.size // 256)
    nested_absmax = np.array(
        [np.abs(centred[g * 256 : (g + 1) * 256]).max() for g in range(groups)], np.float32
    )
    scaled = centred / np.maximum(np.repeat(nested_absmax, 256)[: absmax.size], 1e-30)
    codes = np.abs(scaled[:, None] - nested_map[None, :]).argmin(axis=1).astype(np.uint8)
    state.update(nested_blocksize=256, nested_dtype="float32", nested_offset=offset)
    return {"absmax": codes, "nested_absmax": nested_absmax, "nested_quant_map": nested_map}


def quantize_blocks(
    w: np.ndarray, quant_type: str = "nf4", blocksize: int = 64, nested: bool = False
) -> dict[str, np.ndarray]:
    """The stored tensors of one 4-bit weight, keyed by the suffix after its name.

    ``""`` is the packed codes; then ``"absmax"``, ``"quant_map"``, the ``nested_*`` pair with
    ``nested``, and the quant-state JSON tensor.
    """
    table = STANDARD_MAPS[quant_type]
    flat = np.asarray(w, np.float32).reshape(-1)
    n = flat.size
    blocks = -(-n // blocksize)
    padded = np.zeros(blocks * blocksize, np.float32)
    padded[:n] = flat
    absmax = np.abs(padded.reshape(blocks, blocksize)).max(axis=1).astype(np.float32)
    scaled = (padded.reshape(blocks, blocksize) / np.maximum(absmax, 1e-30)[:, None]).reshape(-1)
    codes = np.abs(scaled[:n, None] - table[None, :]).argmin(axis=1).astype(np.uint8)
    if n % 2:
        codes = np.append(codes, np.uint8(0))
    packed = ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8).reshape(-1, 1)
    state: dict[str, Any] = {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "dtype": "float32",
        "shape": list(np.shape(w)),
    }
    out: dict[str, np.ndarray] = {"": packed, "quant_map": table.copy(), "absmax": absmax}
    if nested:
        out |= _double_quantize(absmax, state)
    out[f"{STATE_PREFIX}{quant_type}"] = _state_tensor(state)
    return out


def write_bnb4_dir(
    directory: Path, quant_type: str = "nf4", nested: bool = False, blocksize: int = 64
) -> Path:
    """A tiny Llama (hidden 64) saved twice under ``directory``, plain and 4-bit packed.

    ``fp/`` is float32; ``bnb-<type>-<0|1>/`` has its decoder projections packed by
    :func:`quantize_blocks` and a bitsandbytes ``quantization_config``.

    Returns:
        The 4-bit directory.
    """
    from safetensors.numpy import load_file, save_file

    directory = Path(directory)
    src = save_tiny(tiny_llama(hidden=64), directory / "fp")
    out: dict[str, np.ndarray] = {}
    for key, value in load_file(str(src / "model.safetensors")).items():
        if ".layers." in key and key.endswith("proj.weight"):
            for suffix, part in quantize_blocks(value, quant_type, blocksize, nested).items():
                out[f"{key}.{suffix}" if suffix else key] = part
        else:
            out[key] = value
    target = directory / f"bnb-{quant_type}-{int(nested)}"
    target.mkdir()
    save_file(out, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": nested,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
    }
    (target / "config.json").write_text(json.dumps(config))
    return target
