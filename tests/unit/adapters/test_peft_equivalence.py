"""Real peft adapters on tiny models: our import + merge == peft's merge_and_unload() (fp32, 1e-6),
and merged logits == on-the-fly logits (spec 8.1, 8.6)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import tolerances as tol

peft = pytest.importorskip("peft")

from rslora_deploy.adapters.detect import load_adapter  # noqa: E402
from rslora_deploy.adapters.layers import apply_on_the_fly  # noqa: E402
from rslora_deploy.adapters.merge_math import merge_deltas  # noqa: E402
from rslora_deploy.testing.tiny import (  # noqa: E402
    example_inputs,
    tiny_glm,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_phi3,
    tiny_qwen2,
    tiny_qwen3,
)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Phi-3's own fused modules (the HF model holds qkv_proj and gate_up_proj, not the parts).
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
#: GLM-4: split q/k/v (with biases), fused gate_up_proj.
GLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]


def _randomize(model: Any, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "vera_lambda" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def _peft_roundtrip(base: Any, config: Any, tmp_path: Path, seed: int = 1) -> tuple[Any, Any]:
    """Wrap a copy with peft, randomize, save; return (peft-merged model, adapter dir)."""
    wrapped = peft.get_peft_model(copy.deepcopy(base), config)
    _randomize(wrapped, seed)
    wrapped.save_pretrained(tmp_path)
    return wrapped, tmp_path


def _assert_same_weights(ours: Any, ref: Any, atol: float = tol.FP32_ATOL) -> int:
    ref_state = ref.state_dict()
    changed = 0
    for name, tensor in ours.state_dict().items():
        other = ref_state[name]
        assert tensor.shape == other.shape, name
        diff = (tensor.float() - other.float()).abs().max().item()
        assert diff <= atol, f"{name}: max diff {diff}"
    for name, param in ours.named_parameters():
        changed += int(not torch.equal(param, dict(ref.named_parameters()).get(name, param)))
    return changed


CASES: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
    (
        "llama-lora",
        tiny_llama,
        lambda: peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False
        ),
    ),
    (
        "llama-rslora-patterns",
        tiny_llama,
        lambda: peft.LoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=LLAMA_TARGETS,
            rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
            alpha_pattern={"v_proj": 3},
        ),
    ),
    (
        "qwen2-lora-bias",
        tiny_qwen2,
        lambda: peft.LoraConfig(
            r=3, lora_alpha=5, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        ),
    ),
    (
        "qwen3-lora",
        tiny_qwen3,
        lambda: peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False
        ),
    ),
    (
        "mistral-rslora",
        tiny_mistral,
        lambda: peft.LoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=LLAMA_TARGETS,
            init_lora_weights=False,
        ),  # fmt: skip
    ),
    (
        "phi3-fused-lora",
        tiny_phi3,
        lambda: peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=PHI3_TARGETS, init_lora_weights=False
        ),
    ),
    (
        "phi3-fused-rslora",
        tiny_phi3,
        lambda: peft.LoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["qkv_proj", "gate_up_proj"],
            init_lora_weights=False,
        ),  # fmt: skip
    ),
    (
        "glm4-lora",
        tiny_glm,
        lambda: peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=GLM_TARGETS, init_lora_weights=False
        ),
    ),
    (
        "glm-rslora",
        lambda: tiny_glm(version=1),
        lambda: peft.LoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=GLM_TARGETS,
            init_lora_weights=False,
        ),  # fmt: skip
    ),
    (
        "gpt2-conv1d",
        tiny_gpt2,
        lambda: peft.LoraConfig(
            r=4, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
        ),
    ),
    (
        "llama-embedding",
        tiny_llama,
        lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    ),
    (
        "llama-vera",
        tiny_llama,
        lambda: peft.VeraConfig(
            r=8, target_modules=["q_proj", "v_proj", "down_proj"], save_projection=True
        ),
    ),
]


@pytest.mark.parametrize(("name", "factory", "make_config"), CASES, ids=[c[0] for c in CASES])
def test_merge_matches_peft_and_on_the_fly(
    name: str, factory: Callable[[], Any], make_config: Callable[[], Any], tmp_path: Path
) -> None:
    base = factory()
    wrapped, adapter_dir = _peft_roundtrip(base, make_config(), tmp_path)
    ids = example_inputs()
    with torch.no_grad():
        peft_logits = wrapped(input_ids=ids).logits
    reference = wrapped.merge_and_unload()

    adapter = load_adapter(adapter_dir)
    assert adapter.format == ("peft-vera" if "vera" in name else "peft-lora")
    ours = copy.deepcopy(base)
    stats = merge_deltas(ours, adapter.deltas)
    assert len(stats) == len(adapter.deltas) > 0
    _assert_same_weights(ours, reference)
    for row in stats:  # every targeted weight really changed
        assert row.max_abs_delta > 0, row.module

    fly = apply_on_the_fly(copy.deepcopy(base), load_adapter(adapter_dir).deltas)
    with torch.no_grad():
        merged_logits = ours(input_ids=ids).logits
        fly_logits = fly(input_ids=ids).logits
        base_logits = base(input_ids=ids).logits
    scale = 1 + fly_logits.abs().max().item()
    assert (merged_logits - fly_logits).abs().max().item() <= tol.FP32_LOGITS_RTOL * scale
    assert (peft_logits - fly_logits).abs().max().item() <= tol.FP32_LOGITS_RTOL * scale
    assert (base_logits - fly_logits).abs().max().item() > 1e-3  # the adapter does something
    assert torch.equal(merged_logits.argmax(-1), fly_logits.argmax(-1))


def test_qwen2_biases_untouched(tmp_path: Path) -> None:
    base = tiny_qwen2()
    wrapped, adapter_dir = _peft_roundtrip(
        base, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj"]), tmp_path
    )
    ours = copy.deepcopy(base)
    merge_deltas(ours, load_adapter(adapter_dir).deltas)
    for layer_ours, layer_base in zip(ours.model.layers, base.model.layers, strict=True):
        assert torch.equal(layer_ours.self_attn.q_proj.bias, layer_base.self_attn.q_proj.bias)
        assert not torch.equal(
            layer_ours.self_attn.q_proj.weight, layer_base.self_attn.q_proj.weight
        )


def test_vera_without_projection_needs_opt_in_then_matches_peft(tmp_path: Path) -> None:
    from rslora_deploy.errors import AdapterFormatError

    base = tiny_llama()
    config = peft.VeraConfig(
        r=8, target_modules=["q_proj", "v_proj"], save_projection=False, projection_prng_key=7
    )
    wrapped, adapter_dir = _peft_roundtrip(base, config, tmp_path)
    reference = wrapped.merge_and_unload()
    with pytest.raises(AdapterFormatError) as info:
        load_adapter(adapter_dir)
    assert info.value.code == "E071"
    shapes = {
        f"model.layers.{i}.self_attn.{p}": (64 if p == "q_proj" else 32, 64)
        for i in range(2)
        for p in ("q_proj", "v_proj")
    }
    adapter = load_adapter(adapter_dir, allow_unverified_vera_regeneration=True, base_shapes=shapes)
    assert adapter.meta["regenerated_projections"] is True
    ours = copy.deepcopy(base)
    merge_deltas(ours, adapter.deltas)
    _assert_same_weights(ours, reference)


def test_vera_regeneration_through_merge_stage(tmp_path: Path) -> None:
    """The stage loads the base first to learn the layer shapes, then regenerates (opt-in)."""
    from rslora_deploy.config import AdapterConfig, MergeConfig
    from rslora_deploy.errors import AdapterFormatError
    from rslora_deploy.stages.merge import merge_adapter
    from rslora_deploy.testing.tiny import save_tiny

    base = tiny_llama()
    base_dir = save_tiny(base, tmp_path / "base")
    config = peft.VeraConfig(r=4, target_modules=["k_proj", "up_proj"], save_projection=False)
    wrapped, adapter_dir = _peft_roundtrip(base, config, tmp_path / "vera")
    reference = wrapped.merge_and_unload()
    with pytest.raises(AdapterFormatError):
        merge_adapter(base_dir, adapter_dir, tmp_path / "out", MergeConfig(), AdapterConfig())
    assert not (tmp_path / "out").exists()
    art = merge_adapter(
        base_dir,
        adapter_dir,
        tmp_path / "out",
        MergeConfig(),
        AdapterConfig(allow_unverified_vera_regeneration=True),
    )
    from transformers import AutoModelForCausalLM

    _assert_same_weights(AutoModelForCausalLM.from_pretrained(art.path), reference)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_rslora_export_loads_in_real_peft(tmp_path: Path, factory: Callable[[], Any]) -> None:
    """Spec 6.3: our exact PEFT export, loaded by peft itself, equals our merged model."""
    import numpy as np

    from rslora_deploy.adapters.convert import to_peft_lora
    from rslora_deploy.adapters.rslora_writer import RsloraSpec, write_checkpoint
    from rslora_deploy.testing.adapters import fake_base_model

    base = factory()
    if factory is tiny_llama:
        mods = {
            "model.layers.0.self_attn.v_proj": {"d_in": 64, "d_out": 32, "layout": "linear"},
            "model.layers.1.mlp.down_proj": {"d_in": 128, "d_out": 64, "layout": "linear"},
        }
    else:
        mods = {
            "transformer.h.0.attn.c_attn": {"d_in": 64, "d_out": 192, "layout": "conv1d"},
            "transformer.h.1.mlp.c_proj": {"d_in": 256, "d_out": 64, "layout": "conv1d"},
        }
    rng = np.random.default_rng(5)
    spec = RsloraSpec(modules=mods, r=4, k=3, alpha=16.0, seed=9, base_model=fake_base_model())
    ckpt = write_checkpoint(
        tmp_path / "rs",
        spec,
        {f"{m}.rslora_v_{f}": rng.uniform(-1, 1, 3) for m in mods for f in "AB"},
    )
    to_peft_lora(ckpt, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    ours = copy.deepcopy(base)
    merge_deltas(ours, load_adapter(ckpt).deltas)
    ids = example_inputs()
    with torch.no_grad():
        y_peft = loaded(input_ids=ids).logits
        y_ours = ours(input_ids=ids).logits
        y_base = base(input_ids=ids).logits
    bound = tol.FP32_LOGITS_RTOL * (1 + y_ours.abs().max().item())
    assert (y_peft - y_ours).abs().max().item() <= bound
    assert (y_base - y_ours).abs().max().item() > 100 * bound
