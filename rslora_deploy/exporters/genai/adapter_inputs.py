"""Run-time LoRA adapters for an onnxruntime-genai graph: LoRA branches as graph inputs.

Every decoder projection node the builder wrote (``MatMulNBits``, or the float ``MatMul`` of a
protected module) gets a float branch beside it (Hu et al. 2021, arXiv 2106.09685):

    y = MatMulNBits(x) + (x @ lora_A) @ lora_B,   lora_A (K, R), lora_B (R, N)

``lora_A`` and ``lora_B`` are graph inputs whose defaults are zero-rank initializers (R = 0), so a
session fed nothing computes ``y = MatMulNBits(x)``: the base's own output. An adapter is a set
of values for those inputs, written as one ``.onnx_adapter`` file (onnxruntime's adapter format,
loaded by ``og.Adapters``). The branch runs in the graph's activation dtype (fp32 on a CPU target,
fp16 on CUDA) and never in int4, so a tiny delta is not rounded away.

One adapter's deltas become the inputs of a node as follows. For the modules m behind the node
(q, k and v behind the builder's fused ``qkv_proj``), with ΔW_m = s_m · B_m @ A_m (d_out_m x K)
and output rows [o_m, o_m + d_out_m) of the node:

    lora_A = [A_m1; A_m2; ...]^T                    (K, R),  R = sum of the ranks
    lora_B[rows of m, o_m : o_m + d_out_m] = (s_m · B_m)^T   (zeros elsewhere)

so x @ lora_A @ lora_B = sum_m x @ ΔW_m^T on each module's rows, exactly the merged delta. The
scale is folded into B in float64 and rounded once to the graph's dtype (RS-LoRA: A and B are the
materialized RSG-1 factors, spec 5.1; VeRA: the scaled shared projections; LoRA: s·B).

A DoRA adapter is not additive (it renormalises each row of W + ΔW), and an embedding or lm_head
target has no branch here: both are refused with the module named, and build merged instead.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rslora_deploy.errors import ExportError

if TYPE_CHECKING:
    from rslora_deploy.adapters.delta import ModuleDelta
    from rslora_deploy.model_view import ModelView

#: The decoder projection nodes of a builder graph (``/model/layers.3/attn/qkv_proj/MatMulNBits``).
_NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/(MatMulNBits|MatMul)$")
_ONNX_FLOAT: dict[int, type[np.floating[Any]]] = {1: np.float32, 10: np.float16}
ADAPTER_SUFFIX = ".onnx_adapter"
ADAPTER_FORMAT_VERSION = 1


class AdapterInputError(ExportError):
    """An adapter does not fit the run-time graph (names, ranks, dtypes, targets, base build)."""


@dataclass(frozen=True)
class Slot:
    """One projection node's LoRA inputs and the Hugging Face modules behind its output rows.

    Attributes:
        node: the builder's weight prefix, ``model.layers.3.attn.qkv_proj``.
        k: the node's input width.
        n: the node's output width.
        modules: ``(module, first_row, rows)`` per Hugging Face module, in output-row order.
    """

    node: str
    k: int
    n: int
    modules: tuple[tuple[str, int, int], ...]

    @property
    def input_a(self) -> str:
        """Graph input name of the (K, R) factor."""
        return f"{self.node}.lora_A"

    @property
    def input_b(self) -> str:
        """Graph input name of the (R, N) factor."""
        return f"{self.node}.lora_B"


def slots_to_json(slots: dict[str, Slot]) -> dict[str, Any]:
    """JSON-ready slots, for ``adapters/graph_inputs.json`` (the on-device rebuild reads it)."""
    return {
        node: {"k": s.k, "n": s.n, "modules": [list(m) for m in s.modules]}
        for node, s in slots.items()
    }


def slots_from_json(data: dict[str, Any]) -> dict[str, Slot]:
    """The inverse of :func:`slots_to_json`."""
    return {
        node: Slot(
            node, int(s["k"]), int(s["n"]), tuple((m, int(f), int(r)) for m, f, r in s["modules"])
        )
        for node, s in data.items()
    }


def _module_rows(view: ModelView) -> dict[str, int]:
    """Output rows of each projection leaf, from the architecture."""
    q = view.heads * view.head_dim
    kv = view.kv_heads * view.head_dim
    return {
        "q_proj": q,
        "k_proj": kv,
        "v_proj": kv,
        "o_proj": view.hidden,
        "gate_proj": view.intermediate,
        "up_proj": view.intermediate,
        "down_proj": view.hidden,
    }


def _attrs(node: Any) -> dict[str, int]:
    return {a.name: int(a.i) for a in node.attribute if a.type == 2}  # AttributeProto.INT


def projection_slots(graph: Any, view: ModelView) -> dict[str, Slot]:
    """The decoder projection nodes of a builder graph, keyed by weight prefix.

    Raises:
        AdapterInputError: a node's width disagrees with the architecture's module widths (the
            graph is not the export of this base).
    """
    from rslora_deploy.exporters.genai.mixed_bits import node_modules

    rows = _module_rows(view)
    slots: dict[str, Slot] = {}
    for node in graph.node:
        match = _NODE.match(node.name)
        if match is None or node.op_type not in ("MatMulNBits", "MatMul"):
            continue
        layer, block, proj, _ = match.groups()
        prefix = f"model.layers.{layer}.{block}.{proj}"
        modules, first = [], 0
        for module in node_modules(prefix):
            width = rows.get(module.rpartition(".")[2])
            if width is None:
                break
            modules.append((module, first, width))
            first += width
        else:
            k, n = _node_widths(graph, node)
            if n != first:
                raise AdapterInputError(
                    f"ONNX node {node.name} has N={n} output rows but its modules "
                    f"{[m for m, _, _ in modules]} have {first}; the graph is not this base's "
                    "export"
                )
            slots[prefix] = Slot(prefix, k, n, tuple(modules))
    return slots


def _node_widths(graph: Any, node: Any) -> tuple[int, int]:
    """(K, N) of a MatMulNBits (attributes) or a float MatMul (its weight initializer)."""
    if node.op_type == "MatMulNBits":
        attrs = _attrs(node)
        return attrs["K"], attrs["N"]
    weight = next(i for i in graph.initializer if i.name == node.input[1])
    return int(weight.dims[0]), int(weight.dims[1])


def activation_dtype(graph: Any) -> type[np.floating[Any]]:
    """The graph's io dtype: the KV cache inputs' element type (fp32 on CPU, fp16 on CUDA)."""
    for value in graph.input:
        if value.name.startswith("past_key_values."):
            return _ONNX_FLOAT[value.type.tensor_type.elem_type]
    raise AdapterInputError("the graph has no past_key_values inputs; not a builder decoder")


def read_slots(model_path: Path, view: ModelView) -> tuple[dict[str, Slot], type[np.floating[Any]]]:
    """Every decoder projection node of a builder graph, and the graph's activation dtype."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return projection_slots(graph, view), activation_dtype(graph)


def add_lora_inputs(model_path: Path, slots: dict[str, Slot]) -> None:
    """Give the nodes of ``slots`` a LoRA branch with zero-rank defaults (module doc).

    Only the nodes some adapter of the package targets get one: a node no adapter touches would
    pay three empty ops per token for nothing. Only the graph file is rewritten (the weights stay
    in the external data file, untouched); it is written beside and renamed over, so a failure
    leaves the old graph.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    dtype = activation_dtype(graph)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes: list[Any] = []
    for node in graph.node:
        nodes.append(node)
        slot = slots.get(_prefix_of(node.name))
        if slot is None:
            continue
        rank = f"{slot.node}.lora_rank"
        graph.input.append(helper.make_tensor_value_info(slot.input_a, elem, [slot.k, rank]))
        graph.input.append(helper.make_tensor_value_info(slot.input_b, elem, [rank, slot.n]))
        # Zero-rank defaults: with nothing fed, x @ A @ B is an empty sum, so y is the base's.
        for name, empty in ((slot.input_a, (slot.k, 0)), (slot.input_b, (0, slot.n))):
            graph.initializer.append(numpy_helper.from_array(np.zeros(empty, dtype), name))
        out = node.output[0]
        base_out = f"{out}/without_lora"
        node.output[0] = base_out
        down, up = f"{node.name}/lora/x_A", f"{node.name}/lora/x_A_B"
        nodes.append(helper.make_node("MatMul", [node.input[0], slot.input_a], [down], name=down))
        nodes.append(helper.make_node("MatMul", [down, slot.input_b], [up], name=up))
        nodes.append(helper.make_node("Add", [base_out, up], [out], name=f"{node.name}/lora/Add"))
    del graph.node[:]
    graph.node.extend(nodes)
    fresh = model_path.with_name(model_path.name + ".lora-tmp")
    onnx.save_model(model, str(fresh))
    fresh.replace(model_path)


def _prefix_of(node_name: str) -> str:
    match = _NODE.match(node_name)
    if match is None:
        return ""
    layer, block, proj, _ = match.groups()
    return f"model.layers.{layer}.{block}.{proj}"


def graph_version(model_path: Path) -> int:
    """The ``model_version`` an adapter carries: the graph file's SHA-256, as a 31-bit number.

    The graph file holds every node and initializer reference (the external data's offsets), so a
    different base build gives a different number. onnxruntime stores the version as an int32,
    hence 31 bits; the manifest records the full graph hash beside it.
    """
    digest = hashlib.sha256(model_path.read_bytes()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def adapter_parameters(
    adapter: str,
    deltas: Iterable[ModuleDelta],
    slots: dict[str, Slot],
    dtype: type[np.floating[Any]],
) -> dict[str, np.ndarray]:
    """The graph-input values that carry ``deltas`` (module doc), only for the nodes they touch.

    Raises:
        AdapterInputError: a delta the run-time graph cannot carry (no slot, a DoRA magnitude, a
            dense delta, an input width that is not the node's), naming ``adapter`` and the module.
    """
    where = {
        module: (slot, first, rows)
        for slot in slots.values()
        for module, first, rows in slot.modules
    }
    per_slot: dict[str, list[tuple[ModuleDelta, int]]] = {}
    for delta in deltas:
        _check_runtime_delta(adapter, delta, where)
        slot, first, rows = where[delta.name]
        start, stop = delta.out_slice or (0, rows)
        if stop - start != delta.d_out or stop > rows:
            raise AdapterInputError(
                f"adapter {adapter!r}: {delta.name} has d_out={delta.d_out} but the base module "
                f"has {rows} output rows; the adapter was trained on another base"
            )
        per_slot.setdefault(slot.node, []).append((delta, first + start))
    params: dict[str, np.ndarray] = {}
    for node, members in per_slot.items():
        slot = slots[node]
        rank = sum(d.rank or 0 for d, _ in members)
        lora_a = np.zeros((slot.k, rank), np.float64)
        lora_b = np.zeros((rank, slot.n), np.float64)
        r0 = 0
        for delta, row in members:
            assert delta.A is not None
            assert delta.B is not None
            r = int(delta.A.shape[0])
            lora_a[:, r0 : r0 + r] = np.asarray(delta.A, np.float64).T
            scaled = np.asarray(delta.B, np.float64) * float(delta.scale)
            lora_b[r0 : r0 + r, row : row + delta.d_out] = scaled.T
            r0 += r
        params[slot.input_a] = lora_a.astype(dtype)
        params[slot.input_b] = lora_b.astype(dtype)
    return params


def _check_runtime_delta(
    adapter: str, delta: ModuleDelta, where: dict[str, tuple[Slot, int, int]]
) -> None:
    if delta.name not in where:
        raise AdapterInputError(
            f"adapter {adapter!r} targets {delta.name}, which has no run-time branch (run-time "
            "adapters cover the decoder's q/k/v/o/gate/up/down projections); build it merged "
            "with a single --adapter"
        )
    if delta.magnitude is not None:
        raise AdapterInputError(
            f"adapter {adapter!r}: {delta.name} is DoRA (it rescales each row of W + dW, which "
            "no additive branch can carry); build it merged with a single --adapter"
        )
    if delta.A is None or delta.B is None:
        raise AdapterInputError(
            f"adapter {adapter!r}: {delta.name} is a dense delta without factors; build it "
            "merged with a single --adapter"
        )
    slot, _, rows = where[delta.name]
    # VeRA's shared projection is wider than most layers; the layer's width picks its columns.
    delta.fit_to_layer(rows, slot.k)
    delta.check_shapes()
    if delta.d_in != slot.k:
        raise AdapterInputError(
            f"adapter {adapter!r}: {delta.name} has d_in={delta.d_in} but the graph's node "
            f"{slot.node} takes K={slot.k}; the adapter was trained on another base"
        )


def write_adapter_file(params: dict[str, np.ndarray], path: Path, model_version: int) -> int:
    """Write ``params`` as an ``.onnx_adapter`` tied to ``model_version``; returns its bytes.

    Written beside and renamed into place, in sorted name order so the bytes depend only on the
    values (the on-device rebuild is compared byte for byte).
    """
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_FORMAT_VERSION)
    fmt.set_model_version(model_version)
    fmt.set_parameters(
        {name: ort.OrtValue.ortvalue_from_numpy(params[name]) for name in sorted(params)}
    )
    fresh = path.with_name(path.name + ".tmp")
    fmt.export_adapter(str(fresh))
    fresh.replace(path)
    return path.stat().st_size


def check_adapter_file(path: Path, model_path: Path, adapter: str) -> dict[str, Any]:
    """Check an ``.onnx_adapter`` against the graph: base build, names, dtypes, shapes.

    Returns:
        ``{"parameters": n, "rank": {node: R}, "bytes": b}`` for the manifest.

    Raises:
        AdapterInputError: naming the adapter and the first input that does not fit.
    """
    import onnx
    import onnxruntime as ort

    fmt = ort.AdapterFormat.read_adapter(str(path))
    version = graph_version(model_path)
    if fmt.get_model_version() != version:
        raise AdapterInputError(
            f"adapter {adapter!r} ({path.name}) was made for another base build (model_version "
            f"{fmt.get_model_version()}, this graph is {version}); rebuild the adapter files "
            "with this package's base"
        )
    graph = onnx.load(str(model_path), load_external_data=False).graph
    inputs = {v.name: v for v in graph.input}
    expected = np.dtype(activation_dtype(graph))
    ranks: dict[str, int] = {}
    params = fmt.get_parameters()
    for name, value in params.items():
        if name not in inputs or not name.endswith((".lora_A", ".lora_B")):
            raise AdapterInputError(
                f"adapter {adapter!r}: parameter {name!r} is not a LoRA input of the graph "
                "(expected model.layers.<i>.<attn|mlp>.<proj>.lora_A/lora_B)"
            )
        array = value.numpy()
        if array.dtype != expected:
            raise AdapterInputError(
                f"adapter {adapter!r}: input {name} is {array.dtype}, the graph takes {expected}"
            )
        dims = inputs[name].type.tensor_type.shape.dim
        fixed = [(i, d.dim_value) for i, d in enumerate(dims) if d.HasField("dim_value")]
        if array.ndim != len(dims) or any(array.shape[i] != v for i, v in fixed):
            want = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
            raise AdapterInputError(
                f"adapter {adapter!r}: input {name} has shape {list(array.shape)}, the graph "
                f"takes {want}"
            )
        node = name.rpartition(".")[0]
        rank = int(array.shape[1] if name.endswith("lora_A") else array.shape[0])
        if ranks.setdefault(node, rank) != rank:
            raise AdapterInputError(
                f"adapter {adapter!r}: {node}.lora_A and .lora_B disagree on the rank "
                f"({ranks[node]} and {rank})"
            )
    for node in ranks:
        for suffix in (".lora_A", ".lora_B"):
            if node + suffix not in params:
                raise AdapterInputError(
                    f"adapter {adapter!r}: {node}{suffix} is missing beside its other factor"
                )
    return {"parameters": len(params), "rank": ranks, "bytes": path.stat().st_size}
