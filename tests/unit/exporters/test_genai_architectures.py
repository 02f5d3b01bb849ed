"""Qwen3 (q/k norms), Mistral and Phi-3 (fused qkv_proj / gate_up_proj in the HF model) through
RTN and the real onnxruntime-genai 0.18 builder on the cpu-2gb profile; GLM and GLM-4, which the
builder cannot read, are refused by name before it runs.

Parity: the ONNX logits (fp32 activations, accuracy level 1, fp32 lm_head) against the exact
dequantization of the same RTN checkpoint, over 40 positions. A builder that ignored Qwen3's
q/k norms or split Phi-3's fused rows wrongly would be off by far more than rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rslora_deploy.artifact import Artifact
from rslora_deploy.config import QuantizeConfig
from rslora_deploy.errors import UnsupportedError
from rslora_deploy.exporters.genai import mixed_bits
from rslora_deploy.exporters.genai.builder import export_onnx
from rslora_deploy.exporters.genai.options import GenaiExportConfig
from rslora_deploy.quantizers.base import QuantizeExtras
from rslora_deploy.quantizers.checkpoint import check_prequantized
from rslora_deploy.stages.quantize import quantize_model
from rslora_deploy.testing import tiny
from rslora_deploy.testing.profiles import genai_cpu_profile
from rslora_deploy.testing.tokenizer import TINY_VOCAB, save_tiny_tokenizer
from tests import tolerances as tol

#: name -> (factory, quantized linears per layer, modules kept at 8 bits).
#: Phi-3 protects its own fused qkv_proj: the mixed-bits rewrite must map the builder's
#: attn.qkv_proj node to that one module, not to q/k/v_proj it does not have.
ARCHS: dict[str, tuple[Callable[..., Any], int, tuple[str, ...]]] = {
    "qwen3": (tiny.tiny_qwen3, 7, ()),
    "mistral": (tiny.tiny_mistral, 7, ()),
    "phi3": (tiny.tiny_phi3, 4, ("model.layers.0.self_attn.qkv_proj",)),
}
EXACT = GenaiExportConfig(lm_head="fp32", accuracy_level=1, protected_layout="nbits8")


def _base(factory: Callable[..., Any], root: Path) -> Path:
    base = tiny.save_tiny(factory(hidden=128, vocab=TINY_VOCAB), root / "base")
    return save_tiny_tokenizer(base)


def _rtn(base: Path, out: Path, protected: tuple[str, ...]) -> Path:
    dynamic = {f"+:^{m.replace('.', chr(92) + '.')}$": {"bits": 8} for m in protected}
    cfg = QuantizeConfig(method="rtn", sym=False)
    return quantize_model(
        Artifact("hf", base), out, cfg, extras=QuantizeExtras(dynamic=dynamic)
    ).path


@pytest.fixture(scope="module", params=sorted(ARCHS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    factory, per_layer, protected = ARCHS[request.param]
    root = tmp_path_factory.mktemp(f"genai-{request.param}")
    quantized = _rtn(_base(factory, root), root / "q", protected)
    art = export_onnx(
        Artifact("hf-quantized", quantized), root / "onnx", EXACT, genai_cpu_profile(),
        root / "export.log",
    )  # fmt: skip
    return request.param, per_layer, protected, quantized, art


def test_rtn_quantizes_every_decoder_linear(exported) -> None:
    _, per_layer, protected, quantized, _ = exported
    assert check_prequantized(quantized)["layers"] == 2 * per_layer
    mixed = mixed_bits.mixed_bits(quantized)
    assert (mixed.overrides if mixed else {}) == dict.fromkeys(protected, 8)


def test_onnx_matches_the_dequantized_checkpoint(exported) -> None:
    import torch

    from rslora_deploy.evaluation.quality import dequantized_gptq_model, onnx_logits

    name, _, protected, quantized, art = exported
    ids = np.random.default_rng(0).integers(3, TINY_VOCAB, 40)
    with torch.no_grad():
        ref = dequantized_gptq_model(quantized)(torch.from_numpy(ids[None])).logits[0].numpy()
    got = onnx_logits(art.path)(ids)
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert rel < min(tol.ONNX_VS_EXACT_DEQUANT, art.meta["parity_tolerance"]), (name, rel)
    if protected:
        assert art.meta["protected_8bit"]["nodes"] == len(protected)
        assert art.meta["protected_8bit"]["promoted_modules"] == 0  # the node is one module


def test_fused_node_of_a_fused_checkpoint_is_that_module() -> None:
    layer = "model.layers.0"
    split = mixed_bits.node_modules(f"{layer}.attn.qkv_proj")
    assert split == tuple(f"{layer}.self_attn.{p}_proj" for p in "qkv")
    phi3 = {f"{layer}.self_attn.qkv_proj", f"{layer}.mlp.gate_up_proj", f"{layer}.mlp.down_proj"}
    assert mixed_bits.node_modules(f"{layer}.attn.qkv_proj", phi3) == (
        f"{layer}.self_attn.qkv_proj",
    )
    assert mixed_bits.node_modules(f"{layer}.mlp.gate_up_proj", phi3) == (
        f"{layer}.mlp.gate_up_proj",
    )
    assert mixed_bits.node_modules(f"{layer}.mlp.down_proj", phi3) == (f"{layer}.mlp.down_proj",)


@pytest.mark.parametrize("version", [4, 1])
def test_glm_is_refused_naming_the_profile_and_the_profiles_that_take_it(
    version: int, tmp_path: Path
) -> None:
    """The 0.18 builder has no GlmForCausalLM / Glm4ForCausalLM model (only the remote-code
    ChatGLM): the export stops before the builder runs, pointing at the Ascend profiles."""
    arch = "Glm4ForCausalLM" if version == 4 else "GlmForCausalLM"
    quantized = _rtn(
        _base(lambda **kw: tiny.tiny_glm(version=version, **kw), tmp_path), tmp_path / "q", ()
    )
    assert check_prequantized(quantized)["layers"] == 2 * 6  # q, k, v, o, gate_up, down
    out = tmp_path / "onnx"
    with pytest.raises(UnsupportedError) as info:
        export_onnx(
            Artifact("hf-quantized", quantized), out, EXACT, genai_cpu_profile(), tmp_path / "x.log"
        )
    message = info.value.message
    assert f"architecture {arch} cannot be exported on profile 'cpu-2gb'" in message, message
    assert "profiles that take it: ascend-310b-2gb, ascend-310p-2gb" in message, message
    assert not out.exists()
