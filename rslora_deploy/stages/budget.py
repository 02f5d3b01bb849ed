"""Stage ``check_budget``: does the exported model fit the device profile's memory?

The estimate is a sum of documented terms (docs/budget.md), each computed from the artifact or the
model config, never guessed:

    weights     = bytes of model.onnx + its external data file(s)          (measured on disk)
    kv_cache    = batch * layers * 2 * kv_heads * head_dim * max_seq_len * kv_bytes
                  (onnxruntime-genai preallocates the cache to max_length: stack-notes measured
                   69 MB growth from 512 to 2048 tokens on SmolLM2 against 70.8 MB by this formula)
    logits      = batch * max_seq_len * vocab * io_bytes     (a full-context prefill's logits)
    activations = batch * max_seq_len * (4 * hidden + 3 * intermediate) * io_bytes
                  + batch * heads * max_seq_len**2 * 4       (one layer's fp32 attention scores,
                                                              upper bound: fused kernels use less)
    reserved    = the profile's runtime allowance (context, kernels, workspace)

    total = weights + kv_cache + logits + activations + reserved;  fits = total <= memory_bytes

This is the same arithmetic as nanoGPT's ``estimate_mfu``: a formula with its inputs printed, so a
reader can check every term. io_bytes is 2 for an fp16-activation (cuda) export, 4 for cpu.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rslora_deploy.model_view import ModelView
from rslora_deploy.profiles import DeviceProfile

MODEL_FILE_SUFFIXES = (".onnx", ".data", ".onnx_data")


def weight_bytes(onnx_dir: Path) -> int:
    """Bytes of the ONNX graph and its external weight files."""
    return sum(
        p.stat().st_size for p in Path(onnx_dir).iterdir()
        if p.is_file() and p.name.endswith(MODEL_FILE_SUFFIXES)
    )  # fmt: skip


def kv_cache_bytes(view: ModelView, profile: DeviceProfile, seq_len: int | None = None) -> int:
    """KV cache preallocated for ``seq_len`` tokens (defaults to the profile's max_seq_len)."""
    seq = seq_len or profile.max_seq_len
    return (
        profile.batch_size * view.layers * 2 * view.kv_heads * view.head_dim * seq
        * profile.kv_bytes_per_element
    )  # fmt: skip


def io_bytes(profile: DeviceProfile) -> int:
    """Bytes per activation element of the exported graph."""
    return 2 if profile.export_target == "cuda" else 4


def estimate(onnx_dir: Path, view: ModelView, profile: DeviceProfile) -> dict[str, Any]:
    """The budget report of an exported model (weights measured on disk)."""
    report = estimate_from_weights(weight_bytes(onnx_dir), view, profile)
    report["weights_source"] = "measured: bytes of the exported ONNX files"
    return report


def estimate_from_weights(weights: int, view: ModelView, profile: DeviceProfile) -> dict[str, Any]:
    """The budget report: every term, the total, the budget and the verdict."""
    seq, batch, io = profile.max_seq_len, profile.batch_size, io_bytes(profile)
    terms = {
        "weights": weights,
        "kv_cache": kv_cache_bytes(view, profile),
        "logits": batch * seq * view.vocab * io,
        "activations": batch * seq * (4 * view.hidden + 3 * view.intermediate) * io
        + batch * view.heads * seq * seq * 4,
        "reserved": profile.reserved_bytes,
    }
    total = sum(terms.values())
    return {
        "profile": profile.name,
        "fits": total <= profile.memory_bytes,
        "budget_bytes": profile.memory_bytes,
        "estimate_bytes": total,
        "headroom_bytes": profile.memory_bytes - total,
        "terms_bytes": terms,
        "inputs": {
            "batch_size": batch,
            "max_seq_len": seq,
            "kv_dtype": profile.kv_dtype,
            "io_bytes": io,
            "layers": view.layers,
            "kv_heads": view.kv_heads,
            "head_dim": view.head_dim,
            "heads": view.heads,
            "hidden": view.hidden,
            "intermediate": view.intermediate,
            "vocab": view.vocab,
        },
        "formula": "weights + kv_cache + logits + activations + reserved <= memory_bytes "
        "(docs/budget.md)",
        "notes": profile.notes,
    }


def decoder_linear_params(view: ModelView) -> int:
    """Weights of the quantized decoder projections (Llama family: q, k, v, o, gate, up, down)."""
    attn = view.hidden * view.head_dim * (2 * view.heads + 2 * view.kv_heads)
    mlp = 3 * view.hidden * view.intermediate
    return view.layers * (attn + mlp)


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
    io = io_bytes(profile)
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
