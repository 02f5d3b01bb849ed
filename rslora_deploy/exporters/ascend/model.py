"""The Ascend decoder: our own small ``nn.Module`` built from Hugging Face weights.

Why not export the transformers model itself: its attention reads a dynamic cache object, builds
masks with ``-inf`` and (depending on the version) emits ops or dtypes ATC rejects. This module
is the whole Llama-family decoder (Llama, Qwen2, Qwen3, Mistral, Phi-3, GLM/GLM-4) in about 200
lines, shaped for a fixed-length KV buffer:

* inputs ``input_ids [1,S]``, ``attention_mask [1,KV+S]``, ``position_ids [1,S]`` and per layer
  ``past_key_i`` / ``past_value_i [1,kv_heads,KV,head_dim]`` (fp16);
* outputs ``logits [1,1,vocab]`` of the last position only, and the S new entries
  ``new_key_i`` / ``new_value_i [1,kv_heads,S,head_dim]`` that the runner copies into the buffer.

Numerics (Touvron et al. 2023, Llama; Su et al. 2021, RoFormer; Ainslie et al. 2023, GQA):

* RMSNorm ``y = w * x / sqrt(mean(x^2) + eps)``, computed in fp32 (the squares of fp16
  activations overflow 65504), cast back to fp16 before the weight, as transformers does;
* RoPE ``q' = q*cos + rotate_half(q)*sin``; the cos/sin tables for positions ``0..max_length-1``
  are computed once by transformers' own rotary class (any rope_type it knows) and stored as fp16
  constants, gathered by ``position_ids`` (no Range/Trig ops in the graph);
* attention ``softmax(q k^T / sqrt(d) masked) v`` with scores and softmax in fp32; GQA by
  reshaping the query heads into ``[kv_heads, group*S]`` instead of repeating K/V (no Expand on a
  dynamic shape);
* the mask is ``Where(allowed, scores, fp16_min)`` (never ``-inf``, never added: adding to the
  fp16 minimum overflows to ``-inf`` and an all-masked padding row would give NaN). ``allowed``
  is ``attention_mask`` AND causality by position: key slot ``p`` of the buffer holds position
  ``p``, the new keys hold ``position_ids``, and a query at position ``i`` sees keys at positions
  ``<= i``; a masked key is moved to position 2^24 so one LessOrEqual does both. No Trilu, no
  Range;
* SwiGLU MLP ``down(silu(gate(x)) * up(x))``; Qwen2 and GLM add biases to q/k/v; lm_head may be
  tied;
* Qwen3 normalizes each query and key head (RMSNorm over ``head_dim``) before RoPE (``qk_norm``);
  GLM-4 adds an RMSNorm after attention and after the MLP, before each residual add
  (``sandwich_norms``). Fused checkpoints (Phi-3's ``qkv_proj``/``gate_up_proj``, GLM's
  ``gate_up_proj``) and GLM's partial interleaved RoPE are converted when the weights are loaded
  (:mod:`rslora_deploy.exporters.ascend.weights`), so the graph is the same for every family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

FP16_MIN = float(torch.finfo(torch.float16).min)


@dataclass(frozen=True)
class DecoderDims:
    """Hyper-parameters of the decoder (normalized from the HF config)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    qkv_bias: bool
    tied: bool
    kv_len: int
    qk_norm: bool = False
    sandwich_norms: bool = False

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)`` with the reduction in fp32 (Zhang & Sennrich 2019)."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, dtype=torch.float16))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize the last dimension."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(torch.float16)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` for ``x = [x1, x2]`` split in halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """GQA self-attention over ``[past buffer ; new keys]`` with RoPE."""

    def __init__(self, dims: DecoderDims) -> None:
        super().__init__()
        self.dims = dims
        h, d = dims.hidden, dims.head_dim
        self.q_proj = nn.Linear(h, dims.heads * d, bias=dims.qkv_bias, dtype=torch.float16)
        self.k_proj = nn.Linear(h, dims.kv_heads * d, bias=dims.qkv_bias, dtype=torch.float16)
        self.v_proj = nn.Linear(h, dims.kv_heads * d, bias=dims.qkv_bias, dtype=torch.float16)
        self.o_proj = nn.Linear(dims.heads * d, h, bias=False, dtype=torch.float16)
        self.q_norm = RMSNorm(d, dims.eps) if dims.qk_norm else None
        self.k_norm = RMSNorm(d, dims.eps) if dims.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        allowed: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer's attention; returns the output and the new K/V entries ``[1,kvh,S,d]``."""
        dims = self.dims
        kvh, d = dims.kv_heads, dims.head_dim
        # Every reshape has at most one -1 (for S) and otherwise constants, so the ONNX graph
        # has constant shape inputs and shape inference can make every gear fully static.
        q = self.q_proj(x).reshape(1, -1, dims.heads, d)  # [1,S,H,d]
        k = self.k_proj(x).reshape(1, -1, kvh, d)  # [1,S,kvh,d]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # per head, over head_dim (Qwen3)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [1,H,S,d], [1,kvh,S,d]
        v = self.v_proj(x).reshape(1, -1, kvh, d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys = torch.cat((past_k, k), dim=2)  # [1,kvh,KV+S,d]
        values = torch.cat((past_v, v), dim=2)
        # Head h uses kv head h // group (transformers' repeat_kv): fold the group into rows
        # (g, s) instead of repeating K/V; the mask is repeated the same way.
        qg = q.reshape(1, kvh, -1, d)  # [1,kvh,grp*S,d]
        scores = torch.matmul(qg, keys.transpose(2, 3)).float() * (1.0 / math.sqrt(d))
        scores = torch.where(allowed, scores, torch.tensor(FP16_MIN, dtype=torch.float32))
        probs = torch.softmax(scores, dim=-1).to(torch.float16)  # [1,kvh,grp*S,KV+S]
        out = torch.matmul(probs, values)  # [1,kvh,grp*S,d]
        out = out.reshape(1, dims.heads, -1, d).transpose(1, 2).reshape(1, -1, dims.heads * d)
        return self.o_proj(out), k, v


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dims: DecoderDims) -> None:
        super().__init__()
        h, i = dims.hidden, dims.intermediate
        self.gate_proj = nn.Linear(h, i, bias=False, dtype=torch.float16)
        self.up_proj = nn.Linear(h, i, bias=False, dtype=torch.float16)
        self.down_proj = nn.Linear(i, h, bias=False, dtype=torch.float16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated MLP."""
        gate = self.gate_proj(x)
        return self.down_proj(gate * torch.sigmoid(gate) * self.up_proj(x))


class Layer(nn.Module):
    """Pre-norm decoder layer."""

    def __init__(self, dims: DecoderDims) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dims.hidden, dims.eps)
        self.self_attn = Attention(dims)
        self.post_attention_layernorm = RMSNorm(dims.hidden, dims.eps)
        self.mlp = MLP(dims)
        # GLM-4's extra norms on each branch's output (HF names kept for the weight copy).
        self.post_self_attn_layernorm = (
            RMSNorm(dims.hidden, dims.eps) if dims.sandwich_norms else None
        )
        self.post_mlp_layernorm = RMSNorm(dims.hidden, dims.eps) if dims.sandwich_norms else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        allowed: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual attention then residual MLP."""
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, allowed, past_k, past_v)
        if self.post_self_attn_layernorm is not None:
            attn = self.post_self_attn_layernorm(attn)
        x = x + attn
        mlp = self.mlp(self.post_attention_layernorm(x))
        if self.post_mlp_layernorm is not None:
            mlp = self.post_mlp_layernorm(mlp)
        return x + mlp, k, v


class AscendDecoder(nn.Module):
    """Llama-family decoder over a fixed-length fp16 KV buffer (module docstring has the I/O).

    Args:
        dims: hyper-parameters.
        cos: ``[max_length, head_dim]`` RoPE cosine table (fp32, stored as fp16).
        sin: the sine table, same shape.
    """

    # Registered buffers, declared for the type checker (nn.Module.__getattr__ is typed
    # Tensor | Module).
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    slot_pos: torch.Tensor

    def __init__(self, dims: DecoderDims, cos: torch.Tensor, sin: torch.Tensor) -> None:
        super().__init__()
        self.dims = dims
        self.embed_tokens = nn.Embedding(dims.vocab, dims.hidden, dtype=torch.float16)
        self.layers = nn.ModuleList(Layer(dims) for _ in range(dims.layers))
        self.norm = RMSNorm(dims.hidden, dims.eps)
        self.lm_head = None
        if not dims.tied:
            self.lm_head = nn.Linear(dims.hidden, dims.vocab, bias=False, dtype=torch.float16)
        self.register_buffer("rope_cos", cos.to(torch.float16), persistent=True)
        self.register_buffer("rope_sin", sin.to(torch.float16), persistent=True)
        self.register_buffer("slot_pos", torch.arange(dims.kv_len).reshape(1, -1), persistent=True)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The registered buffers, typed (``nn.Module.__getattr__`` is untyped)."""
        return self.get_buffer("rope_cos"), self.get_buffer("rope_sin"), self.get_buffer("slot_pos")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """Run S new tokens against the buffer; ``past`` is ``k0, v0, k1, v1, ...``."""
        x = self.embed_tokens(input_ids)
        # embedding() exports as Gather; tensor indexing would give GatherND.
        table_cos, table_sin, slots = self._tables()
        cos = nn.functional.embedding(position_ids, table_cos).unsqueeze(1)  # [1,1,S,d]
        sin = nn.functional.embedding(position_ids, table_sin).unsqueeze(1)
        # Causality and padding in one fp32 comparison (CANN's LessOrEqual takes float16/float,
        # and Greater/And are avoided): a masked-out key is moved to position 2^24, beyond
        # any query. fp32 holds every integer up to 2^24 exactly.
        key_pos = torch.cat((slots, position_ids), dim=1).float()  # [1,KV+S]
        key_pos = key_pos + (1.0 - attention_mask.float()) * float(1 << 24)
        allowed = key_pos.unsqueeze(1) <= position_ids.float().unsqueeze(2)  # [1,S,KV+S]
        grp = self.dims.group
        allowed = torch.cat([allowed] * grp, dim=1) if grp > 1 else allowed  # [1,grp*S,KV+S]
        allowed = allowed.unsqueeze(1)  # against scores [1,kvh,grp*S,KV+S]
        new: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, allowed, past[2 * i], past[2 * i + 1])
            new += [k, v]
        last = self.norm(x[:, -1:, :])
        if self.lm_head is None:
            logits = torch.matmul(last, self.embed_tokens.weight.t())
        else:
            logits = self.lm_head(last)
        return (logits, *new)


def greedy_reference(
    decoder: AscendDecoder, prompt: list[int], steps: int, tie_relative: float = 2.0**-9
) -> tuple[list[int], list[bool]]:
    """Greedy tokens of ``decoder`` in PyTorch, recomputing the whole sequence every step.

    The reference the shipped runner is checked against: no buffer append, no padding, no
    gears. A masked buffer slot contributes exactly nothing (its score is the fp16 minimum), so
    the decoder may be built with any ``max_length`` that covers the positions.

    Returns:
        The tokens, and per step whether the best two logits tie within ``tie_relative`` of
        the best (then the argmax is decided by fp16 rounding, not by the model).
    """
    dims = decoder.dims
    kv = torch.zeros(1, dims.kv_heads, dims.kv_len, dims.head_dim, dtype=torch.float16)
    ids, out, ties = list(prompt), list[int](), list[bool]()
    with torch.no_grad():
        for _ in range(steps):
            mask = torch.zeros(1, dims.kv_len + len(ids), dtype=torch.long)
            mask[0, dims.kv_len :] = 1
            pos = torch.arange(len(ids)).reshape(1, -1)
            logits = decoder(torch.tensor([ids]), mask, pos, *([kv] * 2 * dims.layers))[0]
            row = logits[0, 0].float()
            top = torch.topk(row, 2).values
            ties.append(bool(top[0] - top[1] <= tie_relative * abs(top[0]) + 1e-4))
            out.append(int(row.argmax()))
            ids.append(out[-1])
    return out, ties
