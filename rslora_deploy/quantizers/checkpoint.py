"""Reading and writing Hugging Face checkpoint directories without instantiating the model.

Shared by every quantizer: which linear layers a model has (from a ``meta``-device instance, so
nothing is allocated), the tensors of a (possibly sharded) safetensors checkpoint, and the
consistency check of an already-quantized GPTQ / AWQ checkpoint's config against its tensors.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rslora_deploy.errors import InputError, QuantizationError, UnsupportedError

logger = logging.getLogger(__name__)

#: Files of a model directory that are weights or our own markers, never copied as "extras".
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SKIP_FILES = {
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "rslora-deploy-asset.json",
    "quantize_config.json",
    "quant_log.csv",
}


@dataclass(frozen=True)
class LinearSpec:
    """One quantizable linear layer: dotted module name and its shape."""

    name: str
    in_features: int
    out_features: int
    bias: bool


def read_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of a model directory as a dict (size-capped; see :mod:`model_view`).

    Raises:
        InputError: missing, unreadable, not JSON or not an object.
    """
    from rslora_deploy.model_view import read_config as read_model_config

    return read_model_config(model_dir)


def decoder_linears(model_dir: Path) -> list[LinearSpec]:
    """The ``nn.Linear`` layers inside the decoder blocks, the ones GPTQ/AWQ/RTN quantize.

    The model is built from its config on the ``meta`` device (no memory, no weights read). The
    decoder blocks are the ``nn.ModuleList`` whose length is ``num_hidden_layers``; ``lm_head``
    and embeddings sit outside it and stay in full precision.

    Raises:
        UnsupportedError: transformers cannot build the architecture, or no decoder stack found.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        raise UnsupportedError(
            f"transformers cannot build the model in {model_dir} ({exc}); "
            "use a causal LM architecture supported by transformers"
        ) from None
    n_layers = getattr(config.get_text_config(), "num_hidden_layers", None)
    stack_name = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            stack_name = name
            break
    if stack_name is None:
        raise UnsupportedError(
            f"no decoder layer stack of length num_hidden_layers={n_layers} in {model_dir}; "
            "this architecture is not supported by the quantize stage"
        )
    specs = []
    for name, module in model.named_modules():
        if name.startswith(stack_name + ".") and isinstance(module, torch.nn.Linear):
            specs.append(
                LinearSpec(name, module.in_features, module.out_features, module.bias is not None)
            )
    return specs


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint (single file or shards).

    Raises:
        InputError: there are none (pickle ``.bin`` checkpoints are refused: no pickle).
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise InputError(
            f"no .safetensors weights in {model_dir}; convert the checkpoint to safetensors "
            "(pickle .bin files are not loaded)"
        )
    return files


def load_tensors(model_dir: Path) -> dict[str, Any]:
    """All tensors of a safetensors checkpoint as numpy arrays (bf16 becomes float32)."""
    import torch
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for path in weight_files(model_dir):
        for key, tensor in load_file(path).items():
            if tensor.dtype == torch.bfloat16:
                tensor = tensor.float()
            out[key] = tensor.numpy()
    return out


def tensor_shapes(model_dir: Path) -> dict[str, tuple[list[int], str]]:
    """``name -> (shape, dtype)`` from the safetensors headers, reading no tensor data."""
    shapes: dict[str, tuple[list[int], str]] = {}
    for path in weight_files(model_dir):
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for key, info in header.items():
            if key != "__metadata__":
                shapes[key] = (info["shape"], info["dtype"])
    return shapes


def copy_extras(src: Path, dst: Path) -> None:
    """Copy tokenizer, generation config and templates (everything but weights and config)."""
    for path in Path(src).iterdir():
        if (
            path.is_file()
            and not path.name.endswith(_WEIGHT_SUFFIXES)
            and path.name not in _SKIP_FILES
            and path.name != "config.json"
        ):
            shutil.copy2(path, dst / path.name)


def module_overrides(name: str, dynamic: dict[str, dict[str, Any]] | None) -> dict[str, Any] | None:
    """The gptqmodel ``dynamic`` override of one module: ``{}`` none, ``None`` skip (``-:``)."""
    for pattern, override in (dynamic or {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return None
            continue
        if re.match(pattern.removeprefix("+:"), name):
            return dict(override)
    return {}


def quantization_config(model_dir: Path) -> dict[str, Any] | None:
    """The checkpoint's quantization config (config.json first, then quantize_config.json)."""
    cfg = read_config(model_dir).get("quantization_config")
    if cfg:
        return dict(cfg)
    legacy = Path(model_dir) / "quantize_config.json"
    if legacy.is_file():
        data: dict[str, Any] = json.loads(legacy.read_text(encoding="utf-8"))
        return data
    return None


def check_prequantized(model_dir: Path) -> dict[str, Any]:
    """Check an AutoGPTQ / AutoAWQ / gptqmodel checkpoint's config against its tensors.

    For every layer with a ``qweight`` the packed shapes must follow from ``bits`` and
    ``group_size``: GPTQ ``qweight [in*bits/32, out]``, ``qzeros [groups, out*bits/32]``,
    ``scales [groups, out]``, ``g_idx [in]``; AWQ GEMM ``qweight [in, out*bits/32]``,
    ``qzeros [groups, out*bits/32]``, ``scales [groups, out]``; ``groups = ceil(in/group_size)``.

    Returns:
        A summary: method, bits, group_size, sym, desc_act, number of quantized layers.

    Raises:
        QuantizationError: no quantization config, an unknown method, or a tensor whose shape
            disagrees with the config.
    """
    cfg = quantization_config(model_dir)
    if not cfg:
        raise QuantizationError(f"{model_dir} has no quantization_config; it is not quantized")
    method = str(cfg.get("quant_method") or cfg.get("method") or "gptq").lower()
    if method not in ("gptq", "awq"):
        raise UnsupportedError(
            f"quantized checkpoint {model_dir} uses quant_method={method!r}; only gptq and awq "
            "checkpoints can be exported"
        )
    bits = int(cfg.get("bits", cfg.get("w_bit", 0)))
    group = int(cfg.get("group_size", cfg.get("q_group_size", 0)))
    if bits not in (2, 3, 4, 8) or group == 0:
        raise QuantizationError(
            f"quantization_config of {model_dir} has bits={bits}, group_size={group}; "
            "expected bits 4 or 8 and a group size"
        )
    shapes = {k: v[0] for k, v in tensor_shapes(model_dir).items()}
    layers = [k[: -len(".qweight")] for k in shapes if k.endswith(".qweight")]
    if not layers:
        raise QuantizationError(
            f"{model_dir} declares {method} quantization but has no qweight tensors; "
            "the checkpoint is incomplete"
        )
    for layer in layers:
        # Per-module ``dynamic`` bits (gptqmodel; --protect-adapter writes 8-bit modules).
        layer_bits = int((module_overrides(layer, cfg.get("dynamic")) or {}).get("bits", bits))
        _check_layer(model_dir, layer, shapes, method, layer_bits, group)
    return {
        "method": method, "bits": bits, "group_size": group, "sym": bool(cfg.get("sym", True)),
        "desc_act": bool(cfg.get("desc_act", False)), "layers": len(layers),
        "quantizer": (cfg.get("meta") or {}).get("quantizer"),
    }  # fmt: skip


def _check_layer(
    model_dir: Path, layer: str, shapes: dict[str, list[int]], method: str, bits: int, group: int
) -> None:
    per_word = 32 // bits if 32 % bits == 0 else None
    try:
        qweight, qzeros, scales = (shapes[f"{layer}.{t}"] for t in ("qweight", "qzeros", "scales"))
    except KeyError as exc:
        raise QuantizationError(f"{model_dir}: layer {layer} lacks tensor {exc}") from None
    if method == "gptq":
        out_f = qweight[1]
        in_f = qweight[0] * 32 // bits
    else:
        in_f = qweight[0]
        out_f = qweight[1] * 32 // bits
    groups = math.ceil(in_f / (in_f if group == -1 else group))
    expected = {"scales": [groups, out_f]}
    if per_word:
        expected["qzeros"] = [groups, out_f // per_word]
    actual = {"scales": scales, "qzeros": qzeros}
    if method == "gptq" and f"{layer}.g_idx" in shapes:
        expected["g_idx"] = [in_f]
        actual["g_idx"] = shapes[f"{layer}.g_idx"]
    for name, shape in expected.items():
        if list(actual[name]) != shape:
            raise QuantizationError(
                f"{model_dir}: {layer}.{name} has shape {list(actual[name])} but bits={bits}, "
                f"group_size={group} imply {shape}; the quantization_config does not match the "
                "tensors (re-export the checkpoint or fix its config)"
            )
