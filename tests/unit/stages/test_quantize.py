"""quantize_model on tiny models: validation, RTN checkpoint format, reload, skip path, NaN."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from rslora_deploy.artifact import Artifact
from rslora_deploy.config import QuantizeConfig
from rslora_deploy.errors import (
    ConfigError,
    NonFiniteError,
    QuantizationError,
)
from rslora_deploy.quantizers import rtn_math
from rslora_deploy.quantizers.checkpoint import check_prequantized, decoder_linears
from rslora_deploy.stages.quantize import is_prequantized, quantize_model

LAYER = "model.layers.1.mlp.down_proj"


def _packed(directory, layer=LAYER):
    t = load_file(str(directory / "model.safetensors"))
    return rtn_math.PackedGPTQ(
        t[f"{layer}.qweight"], t[f"{layer}.qzeros"], t[f"{layer}.scales"], t[f"{layer}.g_idx"]
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bits": 3}, "bits"),
        ({"bits": 16}, "bits"),
        ({"group_size": 48}, "group_size"),
        ({"group_size": 8}, "group_size"),
        ({"damp_percent": 0.0}, "damp_percent"),
        ({"method": "hqq"}, "method"),
        ({"calib_samples": 0}, "calib_samples"),
    ],
)
def test_config_rejects(kwargs, field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        QuantizeConfig(**kwargs)


def test_group_size_must_divide_every_layer(tiny_dir, tmp_path):
    out = tmp_path / "q"
    with pytest.raises(
        ConfigError, match=r"group_size=256 does not divide .*\(128\).* 32, 64, 128$"
    ):
        quantize_model(Artifact("hf", tiny_dir), out, QuantizeConfig(method="rtn", group_size=256))
    assert not out.exists()  # validated before anything is written


def test_awq_refuses_8_bits(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="bits=8 is not supported by method awq"):
        quantize_model(
            Artifact("hf", tiny_dir), tmp_path / "q", QuantizeConfig(method="awq", bits=8)
        )
    assert not (tmp_path / "q").exists()


def test_decoder_linears_excludes_lm_head(tiny_dir):
    names = [s.name for s in decoder_linears(tiny_dir)]
    assert len(names) == 14
    assert all(".layers." in n for n in names)
    assert "lm_head" not in " ".join(names)


def test_rtn_checkpoint_is_gptq_v1(rtn_dir, tiny_dir):
    cfg = json.loads((rtn_dir / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq"
    assert cfg["checkpoint_format"] == "gptq"
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["desc_act"]) == (4, 64, True, False)
    assert json.loads((rtn_dir / "quantize_config.json").read_text())["bits"] == 4
    tensors = load_file(str(rtn_dir / "model.safetensors"))
    assert f"{LAYER}.weight" not in tensors
    assert tensors[f"{LAYER}.qweight"].shape == (256 // 8, 128)
    # Unquantized tensors are the source's, bit for bit.
    src = load_file(str(tiny_dir / "model.safetensors"))
    assert np.array_equal(tensors["model.embed_tokens.weight"], src["model.embed_tokens.weight"])
    # Stored codes are exactly the reference quantizer's.
    gq = rtn_math.quantize_rtn(src[f"{LAYER}.weight"], 4, 64, True)
    assert np.array_equal(rtn_math.unpack_gptq(_packed(rtn_dir), 4).q, gq.q)
    assert (rtn_dir / "tokenizer.json").is_file()


def test_gptqmodel_unpacks_rtn_bit_exact(rtn_dir):
    """gptqmodel's own dequantization of our packing equals the reference, bit for bit (fp16)."""
    from gptqmodel import BACKEND, GPTQModel

    # fp16 keeps the stored scales exact (a bf16 load rounds them first).
    model = GPTQModel.load(str(rtn_dir), backend=BACKEND.TORCH, dtype=torch.float16)
    module = model.model.get_submodule(LAYER)
    theirs = module.dequantize_weight().T.to(torch.float16).numpy()  # [out, in]
    ours = rtn_math.dequantize_gptq(_packed(rtn_dir), 4).astype(np.float16)
    assert np.array_equal(theirs, ours)


def _dequantized_reference(tiny_dir, rtn_dir):
    """The tiny model with every quantized weight replaced by the reference dequantization."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    for spec in decoder_linears(tiny_dir):
        w = rtn_math.dequantize_gptq(_packed(rtn_dir, spec.name), 4)
        ref.get_submodule(spec.name).weight.data = torch.from_numpy(w)
    return ref.eval()


def test_transformers_reloads_rtn(rtn_dir, tiny_dir):
    from transformers import AutoModelForCausalLM

    from rslora_deploy.testing.tiny import example_inputs
    from rslora_deploy.testing.tokenizer import TINY_VOCAB

    loaded = AutoModelForCausalLM.from_pretrained(rtn_dir, dtype=torch.float32).eval()
    ref = _dequantized_reference(tiny_dir, rtn_dir)
    ids = example_inputs(vocab=TINY_VOCAB, seq=16)
    with torch.no_grad():
        a, b = loaded(ids).logits, ref(ids).logits
    # gptqmodel's CPU kernel computes in bf16 (TorchAtenLinear): about 3 significant digits.
    assert ((a - b).norm() / b.norm()).item() < 2e-2


def test_prequantized_checkpoint_is_accepted_and_skipped(rtn_dir, tmp_path):
    assert is_prequantized(rtn_dir)
    summary = check_prequantized(rtn_dir)
    assert summary["method"] == "gptq"
    assert summary["layers"] == 14
    out = tmp_path / "never"
    art = quantize_model(Artifact("hf", rtn_dir), out, QuantizeConfig(method="gptq"))
    assert art.meta["prequantized"] is True
    assert art.path == rtn_dir
    assert not out.exists()


def test_prequantized_config_mismatch(rtn_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(rtn_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["group_size"] = 32
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match=r"scales has shape \[4, 128\] but .*group_size=32"):
        check_prequantized(bad)


def test_nan_weight_fails_before_writing(tmp_path):
    from safetensors.numpy import save_file

    from rslora_deploy.testing.tiny import tiny_llama_dir

    src = tiny_llama_dir(tmp_path / "nan", seed=1)
    tensors = load_file(str(src / "model.safetensors"))
    tensors[f"{LAYER}.weight"][3, 5] = np.nan
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "q"
    with pytest.raises(NonFiniteError, match=LAYER):
        quantize_model(Artifact("hf", src), out, QuantizeConfig(method="rtn"))
    assert not out.exists() or not any(out.iterdir())


def test_gptq_tiny_real_engine(tiny_dir, tmp_path):
    """Real gptqmodel GPTQ on the tiny model: a loadable checkpoint closer than RTN's."""
    cfg = QuantizeConfig(method="gptq", group_size=64, calib_samples=8, calib_seq_len=64)
    art = quantize_model(Artifact("hf", tiny_dir), tmp_path / "q", cfg)
    assert art.kind == "hf-quantized"
    assert art.meta["calib"]["samples"] == 8
    assert len(art.meta["calib"]["sha256"]) == 64
    qcfg = json.loads((art.path / "config.json").read_text())["quantization_config"]
    assert "offload_to_disk_path" not in qcfg.get("meta", {})
    assert check_prequantized(art.path)["layers"] == 14


def test_awq_tiny_real_engine(tiny_dir, rtn_dir, tmp_path):
    """Real gptqmodel AWQ on the tiny model: an AutoAWQ GEMM checkpoint that passes our check."""
    cfg = QuantizeConfig(method="awq", group_size=64, calib_samples=4, calib_seq_len=64)
    art = quantize_model(Artifact("hf", tiny_dir), tmp_path / "q", cfg)
    qcfg = json.loads((art.path / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "awq"
    summary = check_prequantized(art.path)
    assert (summary["method"], summary["bits"], summary["group_size"]) == ("awq", 4, 64)
    assert summary["layers"] == 14
    # GEMM layout: qweight [in, out * bits / 32].
    from safetensors.torch import load_file as load_torch

    t = load_torch(str(art.path / "model.safetensors"))
    assert tuple(t[f"{LAYER}.qweight"].shape) == (256, 128 // 8)
    assert t[f"{LAYER}.scales"].dtype == torch.float16  # AutoAWQ's dtype, not gptqmodel's bf16
    from transformers import AutoModelForCausalLM

    from rslora_deploy.testing.tiny import example_inputs
    from rslora_deploy.testing.tokenizer import TINY_VOCAB

    # AWQ folded its scales into the norms: those must survive finalize (not be "restored").
    assert art.meta["unquantized_tensors_modified"] > 0
    ids = example_inputs(vocab=TINY_VOCAB)
    reloaded = AutoModelForCausalLM.from_pretrained(art.path, dtype=torch.float32).eval()
    full = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    rtn = AutoModelForCausalLM.from_pretrained(rtn_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = full(ids).logits
        awq_err = ((reloaded(ids).logits - ref).norm() / ref.norm()).item()
        rtn_err = ((rtn(ids).logits - ref).norm() / ref.norm()).item()
    assert awq_err < 2 * rtn_err, (awq_err, rtn_err)


def test_unsupported_architecture(tmp_path):
    from rslora_deploy.errors import UnsupportedError
    from rslora_deploy.testing.tiny import save_tiny, tiny_gpt2

    src = save_tiny(tiny_gpt2(), tmp_path / "gpt2")
    with pytest.raises(UnsupportedError, match="Conv1D"):
        quantize_model(Artifact("hf", src), tmp_path / "q", QuantizeConfig(method="gptq"))
    assert not (tmp_path / "q").exists()


def test_awq_refuses_gemma3_up_front(tmp_path):
    """gptqmodel 7.6.0's AWQ fails on Gemma-3 (benchmarks): refused before any work."""
    from rslora_deploy.errors import UnsupportedError

    src = tmp_path / "gemma"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "gemma3_text"}')
    with pytest.raises(UnsupportedError, match="use --method gptq or rtn"):
        quantize_model(Artifact("hf", src), tmp_path / "q", QuantizeConfig(method="awq"))
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("model_type", ["phi3", "glm", "glm4"])
def test_gptqmodel_refuses_fused_gate_up_up_front(method, model_type, tmp_path):
    """gptqmodel 7.6.0 mishandles Phi-3's/GLM's fused gate_up_proj (issue #18): refused at once."""
    from rslora_deploy.errors import UnsupportedError

    src = tmp_path / model_type
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(UnsupportedError, match=f"model_type '{model_type}'.*; use --method rtn$"):
        quantize_model(Artifact("hf", src), tmp_path / "q", QuantizeConfig(method=method))
    assert not (tmp_path / "q").exists()
