"""Export an :class:`AscendDecoder` to a standard-op fp16 ONNX graph ATC can compile.

``torch.onnx.export(dynamo=True)``: torch.export traces the module and onnxscript translates it at
opset 18, its lowest native opset. The target is opset 16: CANN documents ReduceMean (our
RMSNorm) for opsets 8-16 only (data/cann_onnx_ops.json), and every other op we emit for 8-18.
onnxscript's version converter (onnx's C++ one) fails on this graph (``axes_input_to_attribute``:
"No initializer or constant input" for ReduceMean), so :func:`downgrade` does the one change
the ops we emit need: opset 18 moved the ``axes`` of ReduceMean & co. from an attribute to an
input; any other op whose definition changed after 16 is refused. The result is stamped IR
version 8 (opset 15-17 is IR 8 in ONNX's versioning table; CANN's parser is built on ONNX
1.12, IR 8). S, the number of new tokens, is the only symbolic dimension:
``input_ids``/``position_ids`` are ``[1,S]`` and ``attention_mask`` is ``[1,KV+S]``, with the
KV buffer length fixed at export. ATC turns that into one ``.om`` with a static graph per gear
(``--dynamic_dims``), so every gear must leave no symbolic dimension anywhere
(:func:`rslora_deploy.exporters.ascend.op_lint.check_gears` verifies it with shape inference).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rslora_deploy.errors import ExportError

logger = logging.getLogger(__name__)

OPSET = 16
EXPORT_OPSET = 18
IR_VERSION = 8
MODEL_FILE = "decoder.onnx"
SEQ_DIM = "S"
MASK_DIM = "KV_plus_S"


def io_names(layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names, in order."""
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(layers):
        inputs += [f"past_key_{i}", f"past_value_{i}"]
        outputs += [f"new_key_{i}", f"new_value_{i}"]
    return inputs, outputs


def example_inputs(dims: Any, seq: int = 3) -> tuple[Any, ...]:
    """Example tensors for tracing: ``seq`` new tokens against an empty buffer."""
    import torch

    kv = torch.zeros(1, dims.kv_heads, dims.kv_len, dims.head_dim, dtype=torch.float16)
    mask = torch.zeros(1, dims.kv_len + seq, dtype=torch.int64)
    mask[0, dims.kv_len :] = 1
    ids = torch.ones(1, seq, dtype=torch.int64)
    pos = torch.arange(seq, dtype=torch.int64).reshape(1, -1)
    return (ids, mask, pos, *[kv.clone() for _ in range(2 * dims.layers)])


def export_decoder(decoder: Any, out_path: Path, max_gear: int) -> dict[str, Any]:
    """Write ``decoder`` as ONNX at ``out_path``; returns export facts for the manifest.

    Raises:
        ExportError: torch.onnx failed (the message quotes its error).
    """
    import onnx
    import torch
    from torch.export import Dim

    dims = decoder.dims
    inputs, outputs = io_names(dims.layers)
    # Dim.DYNAMIC, not a named Dim with a derived KV+S: with named dims torch.export rejects
    # guards it cannot prove for S >= 1 (slice clamps); the mask's length is inferred as S + KV.
    seq = Dim.DYNAMIC
    # forward(input_ids, attention_mask, position_ids, *past): the varargs are one entry.
    dynamic = ({1: seq}, {1: Dim.DYNAMIC}, {1: seq}, tuple([None] * (2 * dims.layers)))
    start = time.perf_counter()
    try:
        # torch.export directly: torch.onnx's own call rewrites the varargs' tuple of dynamic
        # shapes into a list and then rejects it (torch 2.13).
        traced = torch.export.export(decoder, example_inputs(dims), dynamic_shapes=dynamic)
        program = torch.onnx.export(
            traced,
            input_names=inputs,
            output_names=outputs,
            opset_version=EXPORT_OPSET,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    except Exception as exc:  # torch.onnx raises many types; the message is what matters
        raise ExportError(
            f"torch.onnx could not export the Ascend decoder: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:300]}"
        ) from exc
    if program is None:  # only the legacy exporter (dynamo=False) returns None
        raise ExportError("torch.onnx.export returned no ONNX program for the Ascend decoder")
    model = program.model_proto
    downgrade(model)
    finalize(model)
    onnx.save_model(model, str(out_path))
    return {
        "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "seconds": round(time.perf_counter() - start, 2),
        "dims": asdict(dims),
    }


def finalize(model: Any) -> None:
    """Name the symbolic dims, stamp IR 8 and check the opset (in place).

    Raises:
        ExportError: the exporter produced an opset other than :data:`OPSET`.
    """
    import onnx

    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if opsets.get("ai.onnx") != OPSET:
        raise ExportError(f"torch.onnx produced opsets {opsets}, expected ai.onnx {OPSET}")
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", OPSET))
    model.ir_version = IR_VERSION
    for value in model.graph.input:
        shape = value.type.tensor_type.shape
        if value.name in ("input_ids", "position_ids"):
            shape.dim[1].dim_param = SEQ_DIM
        elif value.name == "attention_mask":
            shape.dim[1].dim_param = MASK_DIM
    for value in model.graph.output:
        shape = value.type.tensor_type.shape
        for dim in shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = SEQ_DIM
    del model.graph.value_info[:]
    model.producer_name = "rslora-deploy ascend-om"


_AXES_TO_ATTRIBUTE = {
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
}  # fmt: skip


def downgrade(model: Any) -> None:
    """Rewrite an opset-18 graph as opset :data:`OPSET` (in place).

    Raises:
        ExportError: a node whose op changed at opset 18 in a way not handled here.
    """
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in _AXES_TO_ATTRIBUTE and len(node.input) > 1:
            name = node.input[1]
            if name in inits:
                axes = numpy_helper.to_array(inits[name])
            elif name in constants:
                axes = numpy_helper.to_array(constants[name].attribute[0].t)
            else:
                raise ExportError(f"{node.op_type} node {node.name!r} has computed axes")
            del node.input[1:]
            # noop_with_empty_axes only exists from 18; axes are given, so 0 means the same.
            kept = [a for a in node.attribute if a.name != "noop_with_empty_axes"]
            del node.attribute[:]
            node.attribute.extend(kept)
            node.attribute.append(onnx.helper.make_attribute("axes", [int(a) for a in axes]))
            continue
        since18 = onnx.defs.get_schema(node.op_type, 18, "").since_version
        if since18 == 18:
            raise ExportError(
                f"node {node.name!r} ({node.op_type}) changed at opset 18 and has no opset-17 "
                "rewrite here; extend downgrade"
            )
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = OPSET
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
