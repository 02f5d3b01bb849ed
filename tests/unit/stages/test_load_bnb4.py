"""Stage ``load`` dequantizes a bitsandbytes 4-bit base; the adapter merges into that Wq in fp32.

The first tests use a hand-packed checkpoint and always run; the QLoRA equivalence (our merge
over the 4-bit base vs PEFT's unmerged forward over it, and PEFT's own merge into Linear4bit)
needs bitsandbytes and skips, saying why, without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from rslora_deploy.config import BuildConfig, MergeConfig
from rslora_deploy.errors import Bnb4CheckpointError
from rslora_deploy.stages.load import load_inputs
from rslora_deploy.stages.merge import merge_adapter
from rslora_deploy.testing.bnb4 import write_bnb4_dir as write_bnb_dir
from rslora_deploy.testing.tiny import example_inputs, save_tiny, tiny_llama

Q = "model.layers.0.self_attn.q_proj.weight"
BNB_REASON = "bitsandbytes is not installed: the QLoRA equivalence runs PEFT over Linear4bit"


def edit_tensors(directory: Path, edit: Any) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_load_dequantizes_once_and_records_it(tmp_path: Path) -> None:
    src = write_bnb_dir(tmp_path, "nf4", nested=True)
    (src / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    inputs = load_inputs(BuildConfig(profile="cpu-2gb", base=src))
    summary = inputs.base_quantization
    assert summary is not None
    assert (summary["quant_method"], summary["quant_type"]) == ("bitsandbytes", "nf4")
    assert summary["double_quant"] is True
    assert summary["source"] == str(src)
    assert inputs.base.meta["base_quantization"] == summary
    out = inputs.base.path
    assert out != src
    assert (out / "generation_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    weights = load_file(str(out / "model.safetensors"))
    assert weights[Q].dtype == np.float32
    assert weights[Q].shape == (64, 64)
    again = load_inputs(BuildConfig(profile="cpu-2gb", base=src))  # from the cache
    assert again.base.path == out
    assert again.base_quantization == summary


def test_load_refuses_a_bad_4bit_base(tmp_path: Path) -> None:
    src = write_bnb_dir(tmp_path, "fp4")
    edit_tensors(src, lambda t: t.pop(f"{Q}.absmax"))
    with pytest.raises(Bnb4CheckpointError, match=r"E061: .*q_proj\.weight\.absmax"):
        load_inputs(BuildConfig(profile="cpu-2gb", base=src))


def _logits(model: torch.nn.Module, ids: torch.Tensor, bnb: bool = False) -> torch.Tensor:
    """Logits; a bnb 4-bit model runs in train mode (all dropouts are 0 here): in eval mode on
    a CPU with AVX512-BF16, bitsandbytes 0.50.2 repacks Linear4bit for a bf16 kernel, whose
    logits are 5e-5 off the fp32 forward over Wq on this tiny model (1e-3 of their range)."""
    model.train(bnb)
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_qlora_merge_equals_peft_unmerged_forward(tmp_path: Path, quant_type: str) -> None:
    """Merged by us into the dequantized Wq in fp32 == PEFT's LoRA forward over Linear4bit;
    PEFT's merge into Linear4bit re-quantizes W + dW to 4 bits and loses much of the delta."""
    pytest.importorskip("bitsandbytes", reason=BNB_REASON)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    src = save_tiny(tiny_llama(hidden=64), tmp_path / "fp")
    bnb_cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base4 = tmp_path / "base4"
    AutoModelForCausalLM.from_pretrained(
        src, quantization_config=bnb_cfg, device_map="cpu"
    ).save_pretrained(base4)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    lora.init_lora_weights = False  # random A and B: a delta the logits can see
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base4, device_map="cpu"), lora)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = example_inputs()
    reference = _logits(peft_model, ids, bnb=True)  # LoRA unmerged, over the 4-bit base
    without = _logits(AutoModelForCausalLM.from_pretrained(base4, device_map="cpu"), ids, bnb=True)

    inputs = load_inputs(BuildConfig(profile="cpu-2gb", base=base4, adapter={"path": None}))
    merged = merge_adapter(
        inputs.base.path,
        tmp_path / "adapter",
        tmp_path / "merged",
        MergeConfig(dtype="float32"),
        BuildConfig(profile="cpu-2gb").adapter,
        base_quantization=inputs.base_quantization,
    )
    report = json.loads((merged.path / "merge_report.json").read_text())
    assert report["base_quantization"]["quant_type"] == quant_type
    ours = _logits(AutoModelForCausalLM.from_pretrained(merged.path), ids)
    peft_merged = _logits(peft_model.merge_and_unload(), ids, bnb=True)

    delta = (reference - without).abs().max().item()
    our_error = (ours - reference).abs().max().item()
    peft_error = (peft_merged - reference).abs().max().item()
    print(  # noqa: T201 - the numbers the docs quote (pytest -s shows them)
        f"{quant_type}: LoRA effect {delta:.3e}; max |logit error| ours {our_error:.3e}, "
        f"PEFT merge into Linear4bit {peft_error:.3e}"
    )
    assert delta > 1e-2
    assert our_error < 1e-6
    assert peft_error > 100 * our_error
    assert peft_error > 0.05 * delta


def test_merge_command_merges_into_the_dequantized_base(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``rslora-deploy merge --base <bnb 4-bit dir>`` merges into Wq and records it."""
    from rslora_deploy.cli.app import main
    from rslora_deploy.testing.adapters import write_peft_dir

    src = write_bnb_dir(tmp_path, "fp4")
    rng = np.random.default_rng(0)
    lora_a, lora_b = rng.normal(size=(2, 64)) * 0.01, rng.normal(size=(64, 2)) * 0.01
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    adapter = write_peft_dir(
        tmp_path / "adapter",
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]},
        {f"{module}.lora_A.weight": lora_a, f"{module}.lora_B.weight": lora_b},
    )
    out = tmp_path / "merged"
    code = main(["merge", "--base", str(src), "--adapter", str(adapter), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "merge_report.json").read_text())
    assert report["base_quantization"]["quant_type"] == "fp4"
    wq_dir = load_inputs(BuildConfig(profile="cpu-2gb", base=src)).base.path  # the cached Wq
    wq = load_file(str(wq_dir / "model.safetensors"))[Q]
    merged = load_file(str(out / "model.safetensors"))[Q]
    # W' = Wq + (alpha / r) B A, in fp32: the delta (~1e-4) landed on Wq, not re-quantized
    np.testing.assert_allclose(merged - wq, lora_b @ lora_a, atol=1e-7)


def test_float_quant_storage_is_read_as_bytes(tmp_path: Path) -> None:
    """bnb_4bit_quant_storage=float16/bfloat16 stores the packed codes as a float tensor whose
    bits may read as NaN; they are bytes: not scanned, dequantized as with uint8 storage."""
    src = write_bnb_dir(tmp_path, "nf4")
    plain = load_inputs(BuildConfig(profile="cpu-2gb", base=src)).base.path
    expected = load_file(str(plain / "model.safetensors"))[Q]

    def as_f16(t: dict[str, np.ndarray]) -> None:
        t[Q] = t[Q].reshape(-1).copy()
        t[Q][:2] = [0xFF, 0x7F]  # 0x7FFF as float16: NaN (codes 15, 15, 15, 7)
        t[Q] = t[Q].view(np.float16).reshape(-1, 1)

    edit_tensors(src, as_f16)
    out = load_inputs(BuildConfig(profile="cpu-2gb", base=src)).base.path
    got = load_file(str(out / "model.safetensors"))[Q]
    assert np.isnan(load_file(str(src / "model.safetensors"))[Q]).any()
    assert np.array_equal(got.reshape(-1)[4:], expected.reshape(-1)[4:])
    assert np.all(np.isfinite(got))


def test_transformers_bf16_quant_storage_equals_bitsandbytes(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes", reason=BNB_REASON)
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    src = save_tiny(tiny_llama(hidden=64), tmp_path / "fp")
    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_quant_storage=torch.bfloat16,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base4 = tmp_path / "base4"
    AutoModelForCausalLM.from_pretrained(
        src, quantization_config=cfg, device_map="cpu"
    ).save_pretrained(base4)
    ours = load_file(
        str(load_inputs(BuildConfig(profile="cpu-2gb", base=base4)).base.path / "model.safetensors")
    )
    compared = 0
    for name, param in AutoModelForCausalLM.from_pretrained(
        base4, device_map="cpu"
    ).named_parameters():
        if getattr(param, "quant_state", None) is not None:
            ref = bnbf.dequantize_4bit(param.data, param.quant_state).float().numpy()
            assert np.array_equal(ours[name] + np.float32(0), ref + np.float32(0)), name
            compared += 1
    assert compared == 14
