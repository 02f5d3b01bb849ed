"""End to end through merge_adapter on tiny Llama (GQA, tied variant), Qwen2 (q/k/v biases) and
GPT-2 (Conv1D, fused c_attn with out_slice): the saved merged model, reloaded, gives the logits of
the base with the adapter applied on the fly (spec 8.1)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from rslora_deploy.adapters.base_hash import config_sha256, target_weights_sha256
from rslora_deploy.adapters.detect import load_adapter
from rslora_deploy.adapters.layers import apply_on_the_fly
from rslora_deploy.adapters.rslora_writer import RsloraSpec, write_checkpoint
from rslora_deploy.config import AdapterConfig, MergeConfig
from rslora_deploy.errors import MergeError
from rslora_deploy.stages.merge import merge_adapter
from rslora_deploy.testing.tiny import example_inputs, save_tiny, tiny_gpt2, tiny_llama, tiny_qwen2
from tests import tolerances as tol


def _llama_modules(model: Any) -> dict[str, dict[str, Any]]:
    mods = {}
    for i in range(2):
        for proj, (d_out, d_in) in {
            "self_attn.q_proj": (64, 64),
            "self_attn.k_proj": (32, 64),
            "self_attn.v_proj": (32, 64),
            "self_attn.o_proj": (64, 64),
            "mlp.gate_proj": (128, 64),
            "mlp.up_proj": (128, 64),
            "mlp.down_proj": (64, 128),
        }.items():
            mods[f"model.layers.{i}.{proj}"] = {"d_in": d_in, "d_out": d_out, "layout": "linear"}
    return mods


def _gpt2_modules(model: Any) -> dict[str, dict[str, Any]]:
    return {
        "transformer.h.0.attn.c_attn": {
            "d_in": 64,
            "d_out": 64,
            "layout": "conv1d",
            "out_slice": [128, 192],
        },
        "transformer.h.1.attn.c_attn": {
            "d_in": 64,
            "d_out": 64,
            "layout": "conv1d",
            "out_slice": [0, 64],
        },
        "transformer.h.0.mlp.c_fc": {"d_in": 64, "d_out": 256, "layout": "conv1d"},
        "transformer.h.1.mlp.c_proj": {"d_in": 256, "d_out": 64, "layout": "conv1d"},
    }


def _build(
    tmp: Path, factory: Callable[[], Any], modules: Callable[[Any], dict], **spec_kw: Any
) -> tuple[Any, Path, Path]:
    model = factory()
    base = save_tiny(model, tmp / "base")
    mods = modules(model)
    rng = np.random.default_rng(1)
    spec = RsloraSpec(
        modules=mods,
        r=4,
        k=4,
        alpha=8.0,
        seed=3,
        task_id="e2e",
        base_model={
            "name_or_path": "tiny",
            "architecture": type(model).__name__,
            "config_sha256": config_sha256(base),
            "target_weights_sha256": target_weights_sha256(base, mods)[0],
        },
        **spec_kw,
    )
    v = {f"{m}.rslora_v_{f}": rng.uniform(-1, 1, 4) for m in mods for f in "AB"}
    return model, base, write_checkpoint(tmp / "adapter", spec, v)


CASES = [
    ("llama", tiny_llama, _llama_modules),
    ("qwen2", tiny_qwen2, _llama_modules),
    ("gpt2", tiny_gpt2, _gpt2_modules),
]


@pytest.mark.parametrize(("name", "factory", "modules"), CASES, ids=[c[0] for c in CASES])
def test_merged_checkpoint_logits_equal_on_the_fly(
    tmp_path: Path, name: str, factory: Callable[[], Any], modules: Callable[[Any], dict]
) -> None:
    model, base, adapter = _build(tmp_path, factory, modules)
    art = merge_adapter(base, adapter, tmp_path / "out", MergeConfig(), AdapterConfig())
    assert art.kind == "hf"
    assert art.meta["adapter"]["format"] == "rslora-v1"
    report = json.loads((art.path / "merge_report.json").read_text())
    assert report["base_check"]["weights_match"] is True
    assert len(report["modules"]) == len(modules(model))
    merged = AutoModelForCausalLM.from_pretrained(art.path).eval()
    fly = apply_on_the_fly(model, load_adapter(adapter).deltas)
    ids = example_inputs()
    with torch.no_grad():
        y_merged = merged(input_ids=ids).logits
        y_fly = fly(input_ids=ids).logits
        y_base = AutoModelForCausalLM.from_pretrained(base)(input_ids=ids).logits
    bound = tol.FP32_LOGITS_RTOL * (1 + y_fly.abs().max().item())
    assert (y_merged - y_fly).abs().max().item() <= bound
    assert (y_base - y_fly).abs().max().item() > 100 * bound  # the adapter does something
    assert torch.equal(
        merged.generate(ids, max_new_tokens=4, do_sample=False),
        fly.generate(ids, max_new_tokens=4, do_sample=False),
    )
    if name == "qwen2":  # biases untouched
        base_model = AutoModelForCausalLM.from_pretrained(base)
        assert torch.equal(
            merged.model.layers[0].self_attn.q_proj.bias,
            base_model.model.layers[0].self_attn.q_proj.bias,
        )
    if name == "gpt2":  # out_slice: the other columns of c_attn are bit-identical
        base_model = AutoModelForCausalLM.from_pretrained(base)
        w = merged.transformer.h[0].attn.c_attn.weight
        w0 = base_model.transformer.h[0].attn.c_attn.weight
        assert torch.equal(w[:, :128], w0[:, :128])
        assert not torch.equal(w[:, 128:], w0[:, 128:])


def test_tied_embedding_refused_then_untied(tmp_path: Path) -> None:
    def mods(model: Any) -> dict:
        return {"lm_head": {"d_in": 64, "d_out": 128, "layout": "linear"}}

    model, base, adapter = _build(tmp_path, lambda: tiny_llama(tie=True), mods)
    with pytest.raises(MergeError) as info:
        merge_adapter(
            base, adapter, tmp_path / "out", MergeConfig(), AdapterConfig(allow_base_mismatch=True)
        )
    assert info.value.code == "E050"
    assert not (tmp_path / "out").exists()
    art = merge_adapter(
        base,
        adapter,
        tmp_path / "out",
        MergeConfig(untie=True),
        AdapterConfig(allow_base_mismatch=True),
    )
    cfg = json.loads((art.path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    merged = AutoModelForCausalLM.from_pretrained(art.path)
    assert not torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)
    assert torch.equal(merged.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_output_dtype_single_rounding(tmp_path: Path, dtype: str) -> None:
    model, base, adapter = _build(tmp_path, tiny_llama, _llama_modules)
    art = merge_adapter(base, adapter, tmp_path / "out", MergeConfig(dtype=dtype), AdapterConfig())
    assert art.meta["dtype"] == dtype
    merged = AutoModelForCausalLM.from_pretrained(art.path, dtype="auto")
    target = getattr(torch, dtype)
    name = "model.layers.0.mlp.up_proj"
    (delta,) = [d for d in load_adapter(adapter).deltas if d.name == name]
    # spec 5.2: dW = s * B @ A in fp32, added to fp32 W, rounded once to the output dtype
    dw = (
        torch.from_numpy(delta.B.astype(np.float32)) @ torch.from_numpy(delta.A.astype(np.float32))
    ) * delta.scale
    w32 = model.get_submodule(name).weight.detach().float() + dw
    assert merged.get_submodule(name).weight.dtype == target
    assert torch.equal(merged.get_submodule(name).weight, w32.to(target))  # fp32 -> once
    report = json.loads((art.path / "merge_report.json").read_text())
    assert all(0 <= row["lost_fraction"] <= 1 for row in report["modules"])


@pytest.mark.parametrize("damage", ["truncated", "pickle", "config_not_json"])
def test_damaged_base_is_one_line_input_error(tmp_path: Path, damage: str) -> None:
    from rslora_deploy.errors import InputError

    _, base, adapter = _build(tmp_path, tiny_llama, _llama_modules)
    weights = base / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "pickle":
        import pickle

        weights.write_bytes(pickle.dumps({"w": 1}))
    else:
        (base / "config.json").write_text("{nope")
    with pytest.raises(InputError) as info:
        merge_adapter(base, adapter, tmp_path / "out", MergeConfig(), AdapterConfig())
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 18])
def test_dora_row_norms_blockwise_equal_one_float64_copy(
    layout: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DoRA's row norms, widened to float64 a block at a time, equal one float64 copy's.

    Bit for bit for rows (linear); the column reduction of a stored-transposed weight may take
    another summation order for a narrow block, so there the last float64 bit may differ.
    """
    from rslora_deploy.adapters import merge_math

    monkeypatch.setattr(merge_math, "_NORM_CHUNK_VALUES", chunk)
    weight = torch.randn(37, 23, generator=torch.Generator().manual_seed(5)) * 0.05
    axis = 1 if layout == "linear" else 0
    want = torch.linalg.vector_norm(weight.to(torch.float64), dim=axis)
    got = merge_math._row_norms_f64(weight, layout)
    assert got.dtype == torch.float64
    if layout == "linear":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-15, atol=0.0)
