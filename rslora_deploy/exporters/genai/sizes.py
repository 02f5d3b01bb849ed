"""Predicted weight bytes of an onnxruntime-genai export, before anything is quantized.

Used by ``rslora-deploy budget MODEL`` (through :meth:`GenaiExporter.predict_weights`) and by the
solver, which re-prices a package's measured weights by the predicted delta of one change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
