"""Export of a mixed 4/8-bit GPTQ checkpoint (``--protect-adapter``) to 8-bit ``MatMulNBits``.

The onnxruntime-genai 0.18 builder reads one ``bits`` for the whole checkpoint: a GPTQ checkpoint
whose ``quantization_config.dynamic`` keeps some modules at 8 bits fails inside it (measured:
"size of tensor a (3072) must match ... (1536)"). onnxruntime's ``MatMulNBits`` itself takes
``bits=8`` on the CPU and CUDA execution providers. So the export runs in three steps:

1. :func:`builder_view`: a copy of the checkpoint the builder can read, every module at the base
   bits (8-bit modules re-rounded to 4 bits; those values are placeholders, replaced in step 3).
2. The builder exports that view as usual.
3. :func:`rewrite_protected_nodes`: every ``MatMulNBits`` node that contains a protected module
   gets its weights from the real checkpoint, as an 8-bit ``MatMulNBits`` or, where onnxruntime
   has no fast 8-bit kernel (CPU below accuracy level 4), as an exact dequantized ``MatMul``.
   The builder fuses ``q/k/v_proj`` into one ``qkv_proj`` node; when only some of a fused
   node's modules are protected, the others are promoted to 8-bit codes that represent exactly
   the same values (``q8 = q4 - z4 + 128`` with zero point 128 and the same scale), so no module
   is rounded twice.

``MatMulNBits`` layout (onnxruntime contrib op, bits ``b``, block size ``B``, ``K`` inputs, ``N``
outputs): ``B`` uint8 ``[N, ceil(K/B), B*b/8]``; ``scales`` ``[N * ceil(K/B)]`` in the activation
type; ``zero_points`` uint8 ``[N * ceil(ceil(K/B) * b / 8)]``; weight ``(q - zp) * scale``. At 8
bits every code and every zero point is one byte.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rslora_deploy.errors import ExportError, UnsupportedError
from rslora_deploy.exporters.genai.fused import hf_modules
from rslora_deploy.quantizers import rtn_math
from rslora_deploy.quantizers.checkpoint import (
    module_overrides,
    quantization_config,
    tensor_shapes,
)

logger = logging.getLogger(__name__)

PROTECT_BITS = 8
#: How protected nodes are written (:func:`rewrite_protected_nodes`).
PROTECTED_LAYOUTS = ("nbits8", "float")
#: Zero point of a symmetric 8-bit grid; 4-bit codes promoted to 8 bits are centred on it.
_ZERO_8BIT = 128
_WEIGHT_FILE = "model.safetensors"


@dataclass(frozen=True)
class MixedBits:
    """Per-module bit widths of a GPTQ checkpoint that differ from its base ``bits``."""

    base_bits: int
    group_size: int
    overrides: dict[str, int]


def mixed_bits(checkpoint: Path) -> MixedBits | None:
    """The modules whose ``dynamic`` override changes their bits, or None for a uniform checkpoint.

    Raises:
        UnsupportedError: the mixed checkpoint is AWQ, uses act-order, or overrides something other
            than ``bits`` (none of which this export path writes).
    """
    cfg = quantization_config(checkpoint) or {}
    dynamic = cfg.get("dynamic") or {}
    if not dynamic:
        return None
    base_bits, group = int(cfg.get("bits", 4)), int(cfg.get("group_size", 128))
    overrides: dict[str, int] = {}
    for name in _modules(tensor_shapes(checkpoint)):
        override = module_overrides(name, dynamic)
        if override is None:
            continue
        unsupported = set(override) - {"bits"}
        if unsupported:
            raise UnsupportedError(
                f"{checkpoint}: module {name} overrides {sorted(unsupported)} in "
                "quantization_config.dynamic; the export supports per-module bits only"
            )
        bits = int(override.get("bits", base_bits))
        if bits != base_bits:
            overrides[name] = bits
    if not overrides:
        return None
    method = str(cfg.get("quant_method") or cfg.get("method") or "gptq").lower()
    if method != "gptq" or cfg.get("desc_act"):
        raise UnsupportedError(
            f"{checkpoint} mixes bit widths with quant_method={method!r}, "
            f"desc_act={cfg.get('desc_act')}; mixed-precision export needs a GPTQ checkpoint "
            "without act-order (quantize with --method gptq or rtn and no --desc-act)"
        )
    if base_bits != 4 or set(overrides.values()) != {PROTECT_BITS}:
        raise UnsupportedError(
            f"{checkpoint} mixes bits {sorted({base_bits, *overrides.values()})}; the export "
            f"writes 4-bit checkpoints with {PROTECT_BITS}-bit modules only"
        )
    return MixedBits(base_bits, group, overrides)


def _packed(tensors: dict[str, Any], module: str) -> rtn_math.PackedGPTQ:
    return rtn_math.PackedGPTQ(
        *(tensors[f"{module}.{t}"].numpy() for t in ("qweight", "qzeros", "scales", "g_idx"))
    )


def _load_torch(checkpoint: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if len(files) != 1:
        raise UnsupportedError(
            f"{checkpoint} has {len(files)} safetensors files; the mixed-precision export reads "
            "single-file checkpoints (save the quantized model unsharded)"
        )
    return load_file(files[0])


def builder_view(checkpoint: Path, view_dir: Path, mixed: MixedBits) -> Path:
    """A copy of ``checkpoint`` with every module at ``mixed.base_bits``, for the builder to read.

    Non-weight files are symlinked; the config loses its ``dynamic`` section; each overridden
    module is dequantized and re-rounded (RTN) at the base bits. Those 4-bit values never reach
    the package: :func:`rewrite_protected_nodes` replaces them.
    """
    import torch
    from safetensors.torch import save_file

    view_dir.mkdir(parents=True)
    for item in Path(checkpoint).iterdir():
        if item.suffix == ".safetensors" or item.name in ("config.json", "quantize_config.json"):
            continue
        (view_dir / item.name).symlink_to(item.resolve())
    for name in ("config.json", "quantize_config.json"):
        path = Path(checkpoint) / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        target = data.get("quantization_config", data) if name == "config.json" else data
        target.pop("dynamic", None)
        (view_dir / name).write_text(json.dumps(data, indent=2), encoding="utf-8")
    tensors = _load_torch(checkpoint)
    for module, bits in mixed.overrides.items():
        weight = rtn_math.dequantize_gptq(_packed(tensors, module), bits)
        packed = rtn_math.pack_gptq(
            rtn_math.quantize_rtn(weight, mixed.base_bits, mixed.group_size, sym=True)
        )
        for field in ("qweight", "qzeros", "scales", "g_idx"):
            tensors[f"{module}.{field}"] = torch.from_numpy(getattr(packed, field))
    save_file(tensors, str(view_dir / _WEIGHT_FILE), metadata={"format": "pt"})
    return view_dir


def node_modules(node_prefix: str, present: Collection[str] | None = None) -> tuple[str, ...]:
    """Hugging Face module names behind a builder ``MatMulNBits`` node, in output-row order.

    ``model.layers.3.attn.qkv_proj`` -> ``(model.layers.3.self_attn.q_proj, ...k_proj, ...v_proj)``;
    ``model.layers.3.attn.o_proj`` -> ``(model.layers.3.self_attn.o_proj,)``. With ``present``
    (the checkpoint's modules) holding ``model.layers.3.self_attn.qkv_proj`` itself (Phi-3), the
    fused node is that one module (:func:`rslora_deploy.exporters.genai.fused.hf_modules`).
    """
    head, _, rest = node_prefix.partition(".attn.")
    if rest:
        rest = "attn." + rest
    else:
        head, _, rest = node_prefix.partition(".mlp.")
        rest = "mlp." + rest
    return hf_modules(head, rest, present)


def codes_8bit(gq: rtn_math.GroupQuant) -> tuple[np.ndarray, np.ndarray]:
    """8-bit codes and zero points for one module (4-bit codes promoted without changing values).

    Returns:
        ``(q [out, in] uint8, zeros [out, groups] uint8)``; the scales stay those of ``gq``.
    """
    if gq.bits == PROTECT_BITS:
        return gq.q, gq.zeros.astype(np.uint8)
    groups = gq.zeros.shape[1]
    q = gq.q.astype(np.int16).reshape(gq.q.shape[0], groups, gq.group_size)
    promoted = q - gq.zeros[..., None].astype(np.int16) + _ZERO_8BIT
    zeros = np.full(gq.zeros.shape, _ZERO_8BIT, dtype=np.uint8)
    return promoted.reshape(gq.q.shape).astype(np.uint8), zeros


def rewrite_protected_nodes(
    onnx_dir: Path, checkpoint: Path, mixed: MixedBits, layout: str = "nbits8"
) -> dict[str, Any]:
    """Give every ``MatMulNBits`` node holding a protected module its weights from ``checkpoint``.

    Args:
        onnx_dir: the builder's export; its ``model.onnx`` (+ external data) is rewritten in place.
        checkpoint: the real mixed-bits GPTQ checkpoint (not the :func:`builder_view`).
        mixed: the checkpoint's per-module bit widths (:func:`mixed_bits`).
        layout: ``nbits8``: the node stays ``MatMulNBits`` with ``bits=8`` (1 byte a weight);
            ``float``: it becomes a plain ``MatMul`` on the exact dequantized weight in the
            graph's activation dtype (4 bytes a weight in an fp32 graph). onnxruntime 1.32's CPU
            ``MatMulNBits`` has a fast 8-bit path only at ``accuracy_level`` 4 (int8
            activations): at level 1 a decode-size call took 1.19 ms against 0.04 ms at 4 bits,
            and the demo package decoded 4.4x slower (benchmarks/bench_decode.py).

    Returns:
        What was rewritten: layout, nodes, protected and promoted modules, weight bytes before
        and after.

    Raises:
        ExportError: a protected module has no node, or a node's shape disagrees with its modules.
    """
    import onnx
    from onnx import numpy_helper

    if layout not in PROTECTED_LAYOUTS:
        raise ValueError(f"layout must be one of {PROTECTED_LAYOUTS}, got {layout!r}")
    model_path = Path(onnx_dir) / "model.onnx"
    model = onnx.load(str(model_path), load_external_data=True)
    inits = {init.name: init for init in model.graph.initializer}
    tensors = _load_torch(checkpoint)
    bits_of = {**dict.fromkeys(_modules(tensors), mixed.base_bits), **mixed.overrides}
    done: set[str] = set()
    report: dict[str, Any] = {
        "layout": layout, "nodes": 0, "promoted_modules": 0, "bytes_before": 0, "bytes_after": 0,
    }  # fmt: skip
    dropped: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        prefix = node.input[1].rsplit(".MatMulNBits.", 1)[0]
        modules = node_modules(prefix, bits_of.keys())
        if not any(bits_of.get(m) == PROTECT_BITS for m in modules):
            continue
        codes = _node_codes(node, modules, tensors, bits_of)
        old = [inits[name] for name in node.input[1:4]]
        report["bytes_before"] += sum(numpy_helper.to_array(i).nbytes for i in old)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(old[1].data_type)
        if layout == "float":
            dropped.update(node.input[1:4])
            report["bytes_after"] += _to_float_matmul(model, node, prefix, codes, dtype)
        else:
            report["bytes_after"] += _to_nbits8(node, old, codes, dtype)
        report["nodes"] += 1
        report["promoted_modules"] += sum(bits_of[m] != PROTECT_BITS for m in modules)
        done.update(modules)
    lost = sorted(set(mixed.overrides) - done)
    if lost:
        raise ExportError(
            f"{len(lost)} protected modules (first: {lost[0]}) have no MatMulNBits node in the "
            "export; they would ship at 4 bits, so the export stops"
        )
    if dropped:
        kept = [i for i in model.graph.initializer if i.name not in dropped]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    _save_beside(model, model_path)
    report["protected_modules"] = len(mixed.overrides)
    return report


def _node_codes(
    node: Any, modules: tuple[str, ...], tensors: Any, bits_of: dict[str, int]
) -> rtn_math.GroupQuant:
    """The 8-bit codes of one node: its modules' codes stacked in output-row order.

    Returns:
        ``q`` uint8 ``[N, K]``, fp16 ``scales`` and uint8 ``zeros`` ``[N, K / block]``, bits 8.

    Raises:
        ExportError: a module of the node is not in the checkpoint, or the node's ``N``, ``K``
            or ``block_size`` differs from what its modules give.
    """
    missing = [m for m in modules if m not in bits_of]
    if missing:
        raise ExportError(
            f"ONNX node {node.name} maps to {missing}, which the checkpoint lacks; the builder "
            "named its nodes in a way this export does not know (report it with the model)"
        )
    attrs = {a.name: a for a in node.attribute}
    parts = [rtn_math.unpack_gptq(_packed(tensors, m), bits_of[m]) for m in modules]
    q, zeros = (np.concatenate(x) for x in zip(*(codes_8bit(p) for p in parts), strict=True))
    scales = np.concatenate([p.scales for p in parts])
    n_out, k_in = q.shape
    block = parts[0].group_size
    if (n_out, k_in, block) != (attrs["N"].i, attrs["K"].i, attrs["block_size"].i):
        raise ExportError(
            f"ONNX node {node.name} is N={attrs['N'].i}, K={attrs['K'].i}, block "
            f"{attrs['block_size'].i} but its modules {modules} give N={n_out}, K={k_in}, "
            f"block {block}; the checkpoint and the export disagree"
        )
    return rtn_math.GroupQuant(q, scales, zeros, PROTECT_BITS, block)


def _to_float_matmul(
    model: Any, node: Any, prefix: str, codes: rtn_math.GroupQuant, dtype: np.dtype[Any]
) -> int:
    """Turn ``node`` into a ``MatMul`` on the dequantized weight; returns the weight's bytes.

    The node's old initializers stay in the graph; the caller drops them once no node uses them.
    """
    from onnx import numpy_helper

    exact = rtn_math.GroupQuant(
        codes.q, codes.scales, codes.zeros.astype(np.int64), PROTECT_BITS, codes.group_size
    )
    weight = rtn_math.dequantize(exact).T.astype(dtype)
    name = f"{prefix}.MatMul.weight"
    model.graph.initializer.append(numpy_helper.from_array(weight, name))
    activations = node.input[0]
    del node.input[:]
    node.input.extend([activations, name])
    del node.attribute[:]
    node.op_type, node.domain = "MatMul", ""
    node.name = node.name.replace("MatMulNBits", "MatMul")
    return int(weight.nbytes)


def _to_nbits8(node: Any, old: list[Any], codes: rtn_math.GroupQuant, dtype: np.dtype[Any]) -> int:
    """Write 8-bit codes into the node's B/scales/zero_points initializers; returns their bytes."""
    from onnx import numpy_helper

    n_out, k_in = codes.q.shape
    block = codes.group_size
    new = (
        codes.q.reshape(n_out, k_in // block, block),
        codes.scales.astype(dtype).reshape(-1),
        codes.zeros.reshape(-1),
    )
    written = 0
    for init, array in zip(old, new, strict=True):
        written += array.nbytes
        init.CopyFrom(numpy_helper.from_array(array, init.name))
    {a.name: a for a in node.attribute}["bits"].i = PROTECT_BITS
    return written


def _modules(tensors: Any) -> list[str]:
    """Quantized module names: the keys that end in ``.qweight``, without it."""
    return [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]


def _save_beside(model: Any, model_path: Path) -> None:
    """Write the graph and its external data next to ``model_path``, then swap them in.

    onnx appends to an existing external-data file, so the new pair is written in a fresh
    folder under the same file names and moved over the old ones.
    """
    import onnx

    data_name = model_path.name + ".data"
    fresh = model_path.parent / ".rewrite"
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir()
    onnx.save_model(
        model,
        str(fresh / model_path.name),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )
    for name in (model_path.name, data_name):
        (fresh / name).replace(model_path.parent / name)
    fresh.rmdir()
