"""Tiny random causal LMs built from configs (no download), for tests and examples.

Each factory seeds torch, builds the model with ``AutoModelForCausalLM.from_config`` in fp32 and
re-draws every floating parameter with std 0.05 (so small deltas are not dwarfed by zero-initialized
biases or unit norms), then returns it in eval mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    Glm4Config,
    GlmConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)


def _build(config: Any, seed: int) -> Any:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def _decoder_config(
    config_cls: Any, hidden: int, layers: int, kv_heads: int, tie: bool, vocab: int, **extra: Any
) -> Any:
    """A Llama-style decoder config: 4 query heads, ``kv_heads`` key/value heads, MLP 2x wide.

    ``head_dim`` is set explicitly (``hidden // 4``): Qwen3, Mistral and GLM configs default it
    to 128 whatever the hidden size. ``extra`` overrides or adds fields.
    """
    fields: dict[str, Any] = {
        "head_dim": hidden // 4,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 128,
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    fields.update(extra)
    return config_cls(**fields)


def tiny_llama(
    hidden: int = 64,
    layers: int = 2,
    kv_heads: int = 2,
    seed: int = 0,
    tie: bool = False,
    vocab: int = 128,
) -> Any:
    """LlamaForCausalLM with GQA (4 query heads, ``kv_heads`` key/value heads)."""
    return _build(_decoder_config(LlamaConfig, hidden, layers, kv_heads, tie, vocab), seed)


def tiny_qwen2(
    hidden: int = 64,
    layers: int = 2,
    kv_heads: int = 2,
    seed: int = 0,
    tie: bool = False,
    vocab: int = 128,
) -> Any:
    """Qwen2ForCausalLM: GQA plus biases on q/k/v_proj."""
    return _build(_decoder_config(Qwen2Config, hidden, layers, kv_heads, tie, vocab), seed)


def tiny_qwen3(
    hidden: int = 64,
    layers: int = 2,
    kv_heads: int = 2,
    seed: int = 0,
    tie: bool = False,
    vocab: int = 128,
) -> Any:
    """Qwen3ForCausalLM: GQA plus per-head RMSNorms on q and k (``q_norm``/``k_norm``), no bias."""
    return _build(_decoder_config(Qwen3Config, hidden, layers, kv_heads, tie, vocab), seed)


def tiny_mistral(
    hidden: int = 64,
    layers: int = 2,
    kv_heads: int = 2,
    seed: int = 0,
    tie: bool = False,
    vocab: int = 128,
) -> Any:
    """MistralForCausalLM with GQA and no sliding window (``sliding_window=None``, as v0.2+).

    A window shorter than the context is refused by the Ascend exporter.
    """
    config = _decoder_config(MistralConfig, hidden, layers, kv_heads, tie, vocab)
    config.sliding_window = None
    return _build(config, seed)


def tiny_phi3(
    hidden: int = 64,
    layers: int = 2,
    kv_heads: int = 2,
    seed: int = 0,
    tie: bool = False,
    vocab: int = 128,
) -> Any:
    """Phi3ForCausalLM: the HF model itself fuses ``self_attn.qkv_proj`` and ``mlp.gate_up_proj``.

    ``original_max_position_embeddings`` equals ``max_position_embeddings`` (plain RoPE, the
    Phi-3-mini-4k layout; the 128k models' LongRoPE is a different builder class).
    """
    config = _decoder_config(
        Phi3Config, hidden, layers, kv_heads, tie, vocab, original_max_position_embeddings=128
    )
    return _build(config, seed)


def tiny_glm(
    hidden: int = 64,
    layers: int = 2,
    kv_heads: int = 2,
    seed: int = 0,
    vocab: int = 128,
    version: int = 4,
) -> Any:
    """GLM-4: ``Glm4ForCausalLM`` (``version=4``) or ``GlmForCausalLM`` (``version=1``).

    Both have a fused ``mlp.gate_up_proj``, biases on q/k/v and partial RoPE (half the head)
    with interleaved pairs; Glm4 adds post-attention and post-MLP norms.
    """
    config_cls = Glm4Config if version == 4 else GlmConfig
    return _build(_decoder_config(config_cls, hidden, layers, kv_heads, False, vocab), seed)


def tiny_gemma3(hidden: int = 64, layers: int = 2, seed: int = 0, vocab: int = 128) -> Any:
    """Gemma3ForCausalLM (text): q/k norms, sliding and full layers, tied lm_head.

    Sliding and full layers have their own RoPE bases (transformers 5 stores them per layer type
    in ``rope_parameters``).
    ``layers`` alternate sliding/full so both RoPE tables are exercised; the sliding window (4)
    is shorter than a test sequence so the window matters too.
    """
    config = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=hidden // 4,
        max_position_embeddings=128,
        sliding_window=4,
        layer_types=[
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
        ],
        query_pre_attn_scalar=hidden // 4,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config.architectures = ["Gemma3ForCausalLM"]
    return _build(config, seed)


def tiny_gpt2(hidden: int = 64, layers: int = 2, seed: int = 0, vocab: int = 128) -> Any:
    """GPT2LMHeadModel: Conv1D layers (weights stored (d_in, d_out)), fused c_attn, tied lm_head."""
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _build(config, seed)


def save_tiny(model: Any, directory: Path) -> Path:
    """Save as a tokenizer-less HF directory (config.json + model.safetensors)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    if not (directory / "generation_config.json").is_file():
        (directory / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return directory


def tiny_llama_dir(directory: Path, seed: int = 0, hidden: int = 128) -> Path:
    """A tiny tied Llama (2 layers) saved with the tiny tokenizer: loads, exports and generates.

    Its ``vocab_size`` is the tokenizer's (:data:`rslora_deploy.testing.tokenizer.TINY_VOCAB`),
    so every id the tokenizer produces has an embedding row. Nothing is downloaded or fetched.
    """
    from rslora_deploy.testing.tokenizer import TINY_VOCAB, save_tiny_tokenizer

    model = tiny_llama(hidden=hidden, layers=2, kv_heads=2, seed=seed, tie=True, vocab=TINY_VOCAB)
    save_tiny(model, directory)
    return save_tiny_tokenizer(directory)


def example_inputs(vocab: int = 128, batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    """Random token ids for a tiny model."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=gen)
