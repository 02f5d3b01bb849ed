"""Predicted weight bytes of an onnxruntime-genai export, before anything is quantized.

Used by ``rslora-deploy budget MODEL`` (through :meth:`GenaiExporter.predict_weights`) and by the
solver, which re-prices a package's measured weights by the predicted delta of one change.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rslora_deploy.model_view import ModelView, decoder_linear_params

if TYPE_CHECKING:
    from rslora_deploy.profiles import DeviceProfile


def predict_weight_bytes(
    view: ModelView,
    bits: int,
    group_size: int,
    profile: DeviceProfile,
    lm_head_int4: bool = False,
    context_length: int = 8192,
) -> dict[str, int]:
    """Predict the exported ONNX weight bytes before quantizing (``rslora-deploy budget --model``).

    Mirrors what the onnxruntime-genai builder writes for a GPTQ/AWQ checkpoint:

        projections  = P * bits/8 + P/g * (scale_bytes + bits/8)         (MatMulNBits, zero points)
        lm_head      = V*H * io_bytes, or V*H/2 + V*H/32 * scale_bytes (int4, block 32)
        embedding    = 0 when tied (the builder shares lm_head's table), else as lm_head
        rope_cache   = 2 * context_length * head_dim/2 * io_bytes          (cos and sin tables)
        norms        = (2*layers + 1) * H * io_bytes

    with P = decoder projection weights, g = group size, V = vocab, H = hidden, and scales stored
    in the activation dtype (fp16 for a cuda target, fp32 for cpu).
    """
    from rslora_deploy.exporters import get_exporter

    io = get_exporter(profile.exporter).io_bytes(profile)
    params = decoder_linear_params(view)
    group = group_size if group_size > 0 else view.hidden
    vocab_hidden = view.vocab * view.hidden
    int4_table = vocab_hidden // 2 + vocab_hidden // 32 * io
    lm_head = int4_table if lm_head_int4 else vocab_hidden * io
    return {
        "projections": params * bits // 8 + params // group * io + params // group * bits // 8,
        "embedding": 0 if view.tie_word_embeddings else lm_head,
        "lm_head": lm_head,
        "rope_cache": 2 * context_length * (view.head_dim // 2) * io,
        "norms": (2 * view.layers + 1) * view.hidden * io,
    }


def initializer_bytes(graph: Any) -> dict[str, int]:
    """Bytes of every initializer of an ONNX ``graph`` loaded without its external data."""
    return {
        init.name: next((int(e.value) for e in init.external_data if e.key == "length"), 0)
        or len(init.raw_data)
        for init in graph.initializer
    }


def level4_nbits_bytes(onnx_dir: Path) -> int:
    """Weight bytes of ``model.onnx``'s ``MatMulNBits`` nodes at ``accuracy_level`` 4.

    Codes, scales and zero points, each initializer counted once (a tied int4 table shared with
    the embedding's ``GatherBlockQuantized`` counts with lm_head). Read from the graph only (the
    external data is never loaded); an unreadable graph gives 0, like a level-1 graph.
    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(Path(onnx_dir) / "model.onnx"), load_external_data=False).graph
    except (DecodeError, OSError):
        return 0
    sizes = initializer_bytes(graph)
    counted: set[str] = set()
    for node in graph.node:
        level = next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)
        if node.op_type == "MatMulNBits" and level == 4:
            counted.update(name for name in node.input[1:] if name in sizes)
    return sum(sizes[name] for name in counted)
