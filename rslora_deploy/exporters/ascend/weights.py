"""From a Hugging Face directory (merged, or a GPTQ/AWQ checkpoint) to an AscendDecoder.

A quantized checkpoint is dequantized exactly (``w = scale * (q - zero)``, in fp32) and then
rounded once to fp16, so the choices GPTQ/AWQ made (which grid point each weight went to) are
kept: the fp16 graph computes with the quantized model's weights, not the merged model's.

Architectures are a small table of specs (one class per family, variants override attributes,
as optimum's ``Qwen2OnnxConfig(LlamaOnnxConfig)``); anything else is refused by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from rslora_deploy.errors import ConfigError, InputError, UnsupportedError
from rslora_deploy.model_view import read_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """What differs between the supported decoder families."""

    qkv_bias: ClassVar[bool] = False
    rotary: ClassVar[str] = "transformers.models.llama.modeling_llama:LlamaRotaryEmbedding"
    #: Per-head RMSNorm of q and k before RoPE (Qwen3).
    qk_norm: ClassVar[bool] = False
    #: The HF model stores one ``self_attn.qkv_proj`` (Phi-3): split by rows into q, k, v.
    fused_qkv: ClassVar[bool] = False
    #: The HF model stores one ``mlp.gate_up_proj`` (Phi-3, GLM): gate rows first, then up.
    fused_gate_up: ClassVar[bool] = False
    #: RoPE on the first ``partial_rotary_factor`` of each head, rotating adjacent pairs
    #: ``(2j, 2j+1)`` (GLM), instead of halves of the whole head.
    interleaved_rope: ClassVar[bool] = False
    #: Extra RMSNorms on the attention and MLP outputs before the residual adds (GLM-4).
    sandwich_norms: ClassVar[bool] = False
    #: The model applies ``sliding_window`` whenever it is set (Mistral, Phi-3); Qwen2/Qwen3
    #: only with ``use_sliding_window``.
    window_when_set: ClassVar[bool] = False


class LlamaSpec(ArchSpec):
    """Llama, SmolLM2: no projection biases."""


class Qwen2Spec(ArchSpec):
    """Qwen2 / Qwen2.5: biases on q/k/v_proj, usually an untied lm_head."""

    qkv_bias: ClassVar[bool] = True
    rotary: ClassVar[str] = "transformers.models.qwen2.modeling_qwen2:Qwen2RotaryEmbedding"


class Qwen3Spec(ArchSpec):
    """Qwen3: no biases, RMSNorm on every query and key head (``q_norm``/``k_norm``)."""

    qk_norm: ClassVar[bool] = True
    rotary: ClassVar[str] = "transformers.models.qwen3.modeling_qwen3:Qwen3RotaryEmbedding"


class MistralSpec(ArchSpec):
    """Mistral: Llama's layout; a ``sliding_window`` shorter than the buffer is refused."""

    rotary: ClassVar[str] = "transformers.models.mistral.modeling_mistral:MistralRotaryEmbedding"
    window_when_set: ClassVar[bool] = True


class Phi3Spec(ArchSpec):
    """Phi-3 (plain RoPE): fused ``qkv_proj`` and ``gate_up_proj`` in the checkpoint."""

    rotary: ClassVar[str] = "transformers.models.phi3.modeling_phi3:Phi3RotaryEmbedding"
    fused_qkv: ClassVar[bool] = True
    fused_gate_up: ClassVar[bool] = True
    window_when_set: ClassVar[bool] = True


class GlmSpec(ArchSpec):
    """GLM (``GlmForCausalLM``): q/k/v biases, fused ``gate_up_proj``, partial interleaved RoPE."""

    qkv_bias: ClassVar[bool] = True
    rotary: ClassVar[str] = "transformers.models.glm.modeling_glm:GlmRotaryEmbedding"
    fused_gate_up: ClassVar[bool] = True
    interleaved_rope: ClassVar[bool] = True


class Glm4Spec(GlmSpec):
    """GLM-4 (``Glm4ForCausalLM``): GLM plus post-attention and post-MLP norms."""

    rotary: ClassVar[str] = "transformers.models.glm4.modeling_glm4:Glm4RotaryEmbedding"
    sandwich_norms: ClassVar[bool] = True


ARCHITECTURES: dict[str, type[ArchSpec]] = {
    "LlamaForCausalLM": LlamaSpec,
    "Qwen2ForCausalLM": Qwen2Spec,
    "Qwen3ForCausalLM": Qwen3Spec,
    "MistralForCausalLM": MistralSpec,
    "Phi3ForCausalLM": Phi3Spec,
    "GlmForCausalLM": GlmSpec,
    "Glm4ForCausalLM": Glm4Spec,
}


def arch_spec(
    config: dict[str, Any], model_dir: Path, max_length: int | None = None
) -> type[ArchSpec]:
    """The spec of ``config``'s architecture.

    Raises:
        UnsupportedError: the architecture is not one the Ascend exporter knows (lists them), or
            it attends through a sliding window shorter than ``max_length`` (or any window, when
            ``max_length`` is not given), or uses a RoPE scaling other than plain RoPE on Phi-3.
    """
    arch = str((config.get("architectures") or [config.get("model_type", "unknown")])[0])
    spec = ARCHITECTURES.get(arch)
    if spec is None:
        raise UnsupportedError(
            f"the ascend-om exporter does not support architecture {arch!r} ({model_dir}); "
            f"supported: {', '.join(sorted(ARCHITECTURES))}; use a profile whose exporter is "
            "onnxruntime-genai for other models"
        )
    window = config.get("sliding_window")
    windowed = config.get("use_sliding_window") or spec.window_when_set
    if windowed and window and (max_length is None or int(window) < max_length):
        raise UnsupportedError(
            f"{model_dir}: sliding-window attention (window {window}, buffer {max_length}) is not "
            "supported by the ascend-om exporter; export with export.max_length at most the "
            "window, or set use_sliding_window=false if the model was trained without it"
        )
    if spec.fused_qkv and config.get("original_max_position_embeddings") not in (
        None,
        config.get("max_position_embeddings"),
    ):
        raise UnsupportedError(
            f"{model_dir}: {arch} with LongRoPE (original_max_position_embeddings != "
            "max_position_embeddings, the 128k Phi-3 models) is not supported by the ascend-om "
            "exporter; use a 4k Phi-3 model"
        )
    return spec


def rope_tables(model_dir: Path, spec: type[ArchSpec], max_length: int) -> tuple[Any, Any]:
    """cos/sin ``[max_length, head_dim]`` from transformers' rotary class (fp32).

    For partial interleaved RoPE (GLM) the tables are laid out for :func:`glm_head_order`:
    frequency ``j`` at dims ``j`` and ``j + head_dim/2``, and ``cos = 1, sin = 0`` on the dims that
    are not rotated, so the decoder's whole-head ``rotate_half`` computes GLM's rotation.
    """
    import importlib

    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    module_name, _, attr = spec.rotary.partition(":")
    rotary = getattr(importlib.import_module(module_name), attr)(config)
    positions = torch.arange(max_length).reshape(1, -1)
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    cos, sin = cos[0].float(), sin[0].float()
    if not spec.interleaved_rope:
        return cos, sin
    head_dim = int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )
    half, pairs = head_dim // 2, cos.shape[-1] // 2  # transformers: [S, rotary_dim], freqs twice
    full_cos = torch.ones(max_length, head_dim)
    full_sin = torch.zeros(max_length, head_dim)
    for start in (0, half):
        full_cos[:, start : start + pairs] = cos[:, :pairs]
        full_sin[:, start : start + pairs] = sin[:, :pairs]
    return full_cos, full_sin


def glm_head_order(head_dim: int, rotary_dim: int) -> list[int]:
    """The per-head dim order that turns GLM's interleaved RoPE into ``rotate_half``'s.

    New dim ``p`` takes old dim ``order[p]``: GLM's pairs ``(2j, 2j+1)`` move to
    ``(j, j + head_dim/2)``, where the decoder's ``rotate_half`` pairs them. q and k get the same
    order, so ``q . k`` is unchanged; the dims past ``rotary_dim`` (not rotated) fill the rest of
    each half in order. v is not reordered.
    """
    half, pairs = head_dim // 2, rotary_dim // 2
    passed = list(range(rotary_dim, head_dim))
    first = [2 * j for j in range(pairs)] + passed[: half - pairs]
    second = [2 * j + 1 for j in range(pairs)] + passed[half - pairs :]
    return first + second


def convert_state(
    state: dict[str, Any], spec: type[ArchSpec], dims: Any, rotary_dim: int
) -> dict[str, Any]:
    """HF weights (``model.`` prefix removed) -> the decoder's split, RoPE-ordered weights.

    Splits Phi-3's ``qkv_proj`` rows into q (heads x head_dim), k and v (kv_heads x head_dim),
    and a fused ``gate_up_proj`` into gate (first ``intermediate`` rows) and up, as the HF
    models' ``chunk`` does; reorders GLM's q/k rows per head (:func:`glm_head_order`).
    """
    out = dict(state)
    q_rows, kv_rows = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    order = glm_head_order(dims.head_dim, rotary_dim) if spec.interleaved_rope else None
    for i in range(dims.layers):
        attn, mlp = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        if spec.fused_qkv and f"{attn}.qkv_proj.weight" in out:
            q, k, v = out.pop(f"{attn}.qkv_proj.weight").split([q_rows, kv_rows, kv_rows])
            out.update({f"{attn}.q_proj.weight": q, f"{attn}.k_proj.weight": k})
            out[f"{attn}.v_proj.weight"] = v
        if spec.fused_gate_up and f"{mlp}.gate_up_proj.weight" in out:
            gate, up = out.pop(f"{mlp}.gate_up_proj.weight").chunk(2, dim=0)
            out.update({f"{mlp}.gate_proj.weight": gate, f"{mlp}.up_proj.weight": up})
        if order is None:
            continue
        for proj, heads in (("q_proj", dims.heads), ("k_proj", dims.kv_heads)):
            for kind in ("weight", "bias"):
                key = f"{attn}.{proj}.{kind}"
                if key in out:
                    rows = out[key].reshape(heads, dims.head_dim, -1)[:, order]
                    out[key] = rows.reshape(out[key].shape)
    return out


def _awq_unpack(qweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoAWQ GEMM packing -> integer codes ``[rows, cols*32/bits]`` in column order.

    AutoAWQ stores eight 4-bit columns per int32 in the order 0,2,4,6,1,3,5,7; reading nibble
    ``j`` gives column ``AWQ_ORDER[j]``, so the inverse permutation is 0,4,1,5,2,6,3,7.
    """
    per = 32 // bits
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    codes = (qweight.astype(np.uint32)[:, :, None] >> shifts) & ((1 << bits) - 1)
    reverse = np.array([0, 4, 1, 5, 2, 6, 3, 7]) if per == 8 else np.arange(per)
    return codes[:, :, reverse].reshape(qweight.shape[0], -1).astype(np.float32)


def awq_dequantize(
    qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, bits: int
) -> np.ndarray:
    """Exact fp32 weight ``[out, in]`` of an AutoAWQ GEMM layer: ``(q - z) * s`` per group."""
    q = _awq_unpack(qweight, bits)  # [in, out]
    zeros = _awq_unpack(qzeros, bits)  # [in/g, out]
    group = q.shape[0] // zeros.shape[0]
    s = scales.astype(np.float32)
    w = (q - np.repeat(zeros, group, axis=0)) * np.repeat(s, group, axis=0)
    return np.ascontiguousarray(w.T)


def _awq_state_dict(model_dir: Path, bits: int) -> dict[str, Any]:
    import torch

    from rslora_deploy.quantizers.checkpoint import load_tensors

    tensors = load_tensors(model_dir)
    state: dict[str, Any] = {}
    for key, value in tensors.items():
        if key.endswith(".qweight"):
            layer = key[: -len(".qweight")]
            w = awq_dequantize(value, tensors[f"{layer}.qzeros"], tensors[f"{layer}.scales"], bits)
            state[f"{layer}.weight"] = torch.from_numpy(w)
        elif not key.endswith((".qzeros", ".scales")):
            state[key] = torch.from_numpy(np.ascontiguousarray(value)).float()
    return state


def source_state_dict(model_dir: Path) -> tuple[dict[str, Any], str]:
    """fp32 weights of ``model_dir`` keyed like the HF model, and where they came from.

    Raises:
        UnsupportedError: a quantization method other than GPTQ or AWQ.
    """
    from rslora_deploy.quantizers.checkpoint import load_tensors, quantization_config

    qcfg = quantization_config(model_dir)
    if qcfg is None:
        import torch

        tensors = load_tensors(model_dir)
        return {k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in tensors.items()}, (
            "full precision"
        )
    method = str(qcfg.get("quant_method", "gptq"))
    if method == "gptq":
        from rslora_deploy.evaluation.quality import dequantized_gptq_model

        model = dequantized_gptq_model(model_dir)
        return {k: v.detach().float() for k, v in model.state_dict().items()}, "gptq dequantized"
    if method == "awq":
        return _awq_state_dict(model_dir, int(qcfg.get("bits", 4))), "awq dequantized"
    raise UnsupportedError(
        f"{model_dir}: quantization method {method!r} cannot be exported for Ascend; "
        "supported: full precision, gptq, awq"
    )


def build_decoder(model_dir: Path, max_length: int) -> tuple[Any, dict[str, Any]]:
    """The fp16 :class:`AscendDecoder` of ``model_dir`` with a ``max_length`` KV buffer.

    Returns:
        The module (eval mode) and facts for the manifest (architecture, weight source).

    Raises:
        UnsupportedError: unknown architecture or quantization method.
        InputError: the checkpoint's tensors do not fit the architecture.
    """
    import torch

    from rslora_deploy.exporters.ascend.model import AscendDecoder

    config = read_config(model_dir)
    spec = arch_spec(config, model_dir, max_length)
    dims = decoder_dims(config, spec, max_length)
    cos, sin = rope_tables(model_dir, spec, max_length)
    rotary_dim = _rotary_dim(config, dims.head_dim)
    state, source = source_state_dict(model_dir)
    state = {k.removeprefix("model."): v for k, v in state.items()}
    state = convert_state(state, spec, dims, rotary_dim)
    if dims.tied:
        state.pop("lm_head.weight", None)
    decoder = AscendDecoder(dims, cos, sin)
    expected = set(decoder.state_dict()) - {"rope_cos", "rope_sin", "slot_pos"}
    missing, unexpected = expected - set(state), set(state) - expected
    unexpected = {k for k in unexpected if not k.endswith("rotary_emb.inv_freq")}
    if missing or unexpected:
        raise InputError(
            f"{model_dir}: tensors do not fit {config['architectures'][0]} (missing "
            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); is config.json right?"
        )
    with torch.no_grad():
        for name, param in decoder.named_parameters():
            param.copy_(state[name].to(torch.float16))
    _check_finite(decoder, model_dir)
    return decoder.eval(), {"architecture": config["architectures"][0], "weights_from": source}


def decoder_dims(config: dict[str, Any], spec: type[ArchSpec], max_length: int) -> Any:
    """:class:`DecoderDims` from a config dict."""
    from rslora_deploy.exporters.ascend.model import DecoderDims

    if max_length < 1:
        raise ConfigError(f"export.max_length must be positive, got {max_length}")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return DecoderDims(
        vocab=int(config["vocab_size"]),
        hidden=hidden,
        intermediate=int(config["intermediate_size"]),
        layers=int(config["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        eps=float(config.get("rms_norm_eps", 1e-6)),
        qkv_bias=spec.qkv_bias or bool(config.get("attention_bias", False)),
        tied=bool(config.get("tie_word_embeddings", False)),
        kv_len=max_length,
        qk_norm=spec.qk_norm,
        sandwich_norms=spec.sandwich_norms,
    )


def _rotary_dim(config: dict[str, Any], head_dim: int) -> int:
    """Dims of a head that RoPE rotates: ``partial_rotary_factor`` (GLM: 0.5) of ``head_dim``."""
    rope = config.get("rope_parameters") or {}
    factor = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    return int(head_dim * float(factor or 1.0))


def _check_finite(decoder: Any, model_dir: Path) -> None:
    """fp16 has a range of +-65504: a weight beyond it would become inf silently."""
    import torch

    for name, param in decoder.named_parameters():
        if not torch.isfinite(param).all():
            raise InputError(
                f"{model_dir}: weight {name} is not finite in fp16 (|w| > 65504 or NaN); this "
                "model cannot run as an fp16 Ascend graph"
            )
