"""Real GPTQ (gptqmodel 7.6.0) on the real SmolLM2-135M, small enough for CI (8 x 128 tokens).

The checkpoint the quantize stage writes must reload through plain
``transformers.AutoModelForCausalLM`` with logits matching the quantized model held in memory.
"In memory" here is the fp32 model whose every linear weight is the dequantization of the packed
tensors (our independent reference, ``rtn_math.dequantize_gptq``), built without transformers'
or gptqmodel's loaders. (gptqmodel's own in-memory model right after ``quantize()`` is not a
usable reference: with disk offload its layers are gone, and without offload its forward differed
from the saved checkpoint by a relative 0.16 on a tiny model while the saved checkpoint matched
the reference to 0.0007.)
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tests import tolerances as tol

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

pytestmark = pytest.mark.slow


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_gptq_smollm2_reloads_through_transformers(smollm2_dir, tmp_path):
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rslora_deploy.artifact import Artifact
    from rslora_deploy.config import QuantizeConfig
    from rslora_deploy.quantizers import rtn_math
    from rslora_deploy.quantizers.checkpoint import check_prequantized, decoder_linears
    from rslora_deploy.stages.quantize import quantize_model

    cfg = QuantizeConfig(method="gptq", group_size=64, calib_samples=8, calib_seq_len=128)
    art = quantize_model(Artifact("hf", smollm2_dir), tmp_path / "gptq", cfg)
    out = art.path
    assert art.meta["calib"]["samples"] == 8
    assert art.meta["calib"]["source"] == "brown:calibration"

    summary = check_prequantized(out)
    assert (summary["method"], summary["bits"], summary["group_size"]) == ("gptq", 4, 64)
    assert summary["layers"] == 30 * 7
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["checkpoint_format"] == "gptq"
    assert "offload_to_disk_path" not in qcfg["meta"]

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = (
        "The committee met on Tuesday to discuss the budget for the county's schools and "
        "roads, and after a long debate it agreed to raise the allowance for teachers."
    )
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text)["input_ids"]]])

    tensors = load_file(str(out / "model.safetensors"))
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        full = reference(ids).logits[0]
    for spec in decoder_linears(smollm2_dir):
        n = spec.name
        packed = rtn_math.PackedGPTQ(
            tensors[f"{n}.qweight"],
            tensors[f"{n}.qzeros"],
            tensors[f"{n}.scales"],
            tensors[f"{n}.g_idx"],
        )
        weight = torch.from_numpy(rtn_math.dequantize_gptq(packed, 4))
        reference.get_submodule(n).weight.data = weight
    with torch.inference_mode():
        in_memory = reference(ids).logits[0]

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = reloaded(ids).logits[0].float()
    rel, rel_fp = _rel(logits, in_memory), _rel(in_memory, full)
    agree = (logits.argmax(-1) == in_memory.argmax(-1)).float().mean().item()
    # gptqmodel's CPU kernel runs the int4 matmuls in bf16: a small residual, far below the
    # quantization error itself.
    assert rel < tol.GPTQMODEL_BF16_KERNEL, rel
    assert rel < rel_fp / 3, (rel, rel_fp)
    assert agree >= 0.9, agree
    assert np.isfinite(logits.numpy()).all()
