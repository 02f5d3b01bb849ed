"""Last-token logits: what the shipped graph returns, and a full-logits view for evaluation only.

Generation reads the logits of the last position only, yet a stock builder graph computes
``[batch, sequence, vocab]`` logits in prefill: ``max_length * vocab * io_bytes`` bytes (1.24 GB for
Qwen2.5-0.5B at 2048 tokens on a CPU target). The onnxruntime-genai 0.18 builder's
``prune_lm_head=true`` inserts ``Gather(axis=1, index=-1) -> Unsqueeze(axis=1)`` on the final hidden
state before ``lm_head``, so the logits output is ``[batch, 1, vocab]``; onnxruntime-genai samples
from it unchanged (greedy output token-identical on the tests' prompts).

Perplexity needs every position's logits. :func:`full_logits_graph` rewrites the graph in memory:
the two prune nodes are bypassed so ``lm_head`` reads every position; the session reads the
folder's own external weights (:func:`session_from_bytes`), so evaluation scores the shipped
weights and nothing is written into the package.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

GRAPH = "model.onnx"
LOGITS = "logits"
PRUNE_GATHER = "/lm_head/prune/Gather"
PRUNE_UNSQUEEZE = "/lm_head/prune/Unsqueeze"
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"


def _load_graph(onnx_dir: Path) -> Any:
    import onnx

    return onnx.load(str(Path(onnx_dir) / GRAPH), load_external_data=False)


def logits_positions(onnx_dir: Path) -> str:
    """``"last"`` when the graph's logits output has one position per sequence, else ``"all"``.

    Read from the graph's declared output shape (``[batch, 1, vocab]`` vs
    ``[batch, sequence_length, vocab]``), not from any config, so it says what ships.
    """
    from google.protobuf.message import DecodeError

    try:
        model = _load_graph(onnx_dir)
    except (DecodeError, OSError) as exc:
        # Unreadable graph: assume every position, the larger (safe) logits charge.
        logger.warning(
            "%s/%s unreadable (%s): logits charged for every position", onnx_dir, GRAPH, exc
        )
        return "all"
    for output in model.graph.output:
        if output.name == LOGITS:
            dims = output.type.tensor_type.shape.dim
            if len(dims) == 3 and dims[1].HasField("dim_value") and dims[1].dim_value == 1:
                return "last"
            return "all"
    return "all"


def lm_head_is_float(onnx_dir: Path) -> bool:
    """Whether ``lm_head`` is a float ``MatMul`` (not ``MatMulNBits``); unreadable: True (safe)."""
    from google.protobuf.message import DecodeError

    try:
        model = _load_graph(onnx_dir)
    except (DecodeError, OSError):
        return True
    ops = {n.op_type for n in model.graph.node if n.name.startswith("/lm_head/")}
    return "MatMulNBits" not in ops


def full_logits_graph(onnx_dir: Path) -> bytes | None:
    """The folder's graph rewritten to return logits for every position (None: it already does).

    Serialized bytes. The prune ``Gather``/``Unsqueeze`` are bypassed (``lm_head`` reads the final
    norm's output) and the logits shape restored. The bytes reference the folder's external weights
    by their relative names: open them with :func:`session_from_bytes`, never write them into the
    folder.
    """
    if logits_positions(onnx_dir) == "all":
        return None
    model = _load_graph(onnx_dir)
    graph = model.graph
    nodes = {node.name: node for node in graph.node}
    gather, unsqueeze = nodes[PRUNE_GATHER], nodes[PRUNE_UNSQUEEZE]
    hidden, pruned = gather.input[0], unsqueeze.output[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == pruned:
                node.input[i] = hidden
    kept = [n for n in graph.node if n.name not in (PRUNE_GATHER, PRUNE_UNSQUEEZE)]
    del graph.node[:]
    graph.node.extend(kept)
    dropped = {gather.output[0], pruned}
    kept_info = [v for v in graph.value_info if v.name not in dropped]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    # The logits output and the lm_head chain's value_info carry the pruned "1" position.
    for info in [*graph.output, *graph.value_info]:
        dims = info.type.tensor_type.shape.dim
        if (info.name == LOGITS or info.name.startswith("/lm_head/")) and len(dims) == 3:
            dims[1].Clear()
            dims[1].dim_param = "sequence_length"
    return bytes(model.SerializeToString())


def session_from_bytes(model: bytes, onnx_dir: Path, options: Any, providers: list[str]) -> Any:
    """An onnxruntime session of serialized ``model`` whose external weights live in ``onnx_dir``.

    onnxruntime resolves external data relative to the model's folder and refuses paths that
    escape it, so the folder where ``model.onnx`` really lives (through a ``cpu_view``'s symlinks)
    is named through the session config.
    """
    import onnxruntime as ort

    folder = (Path(onnx_dir) / GRAPH).resolve().parent
    options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(folder))
    return ort.InferenceSession(model, options, providers=providers)
