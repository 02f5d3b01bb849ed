"""Evaluation protocol arithmetic with synthetic logit functions, and windowing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rslora_deploy.evaluation.quality import EvalText, run_lockstep, windows_from_texts
from tests import tolerances as tol

VOCAB = 10


def _text(windows=3, length=6, seed=0):
    ids = np.random.default_rng(seed).integers(0, VOCAB, size=(windows, length))
    return EvalText(ids, windows * (length - 1), {})


def test_uniform_model_has_perplexity_vocab():
    out = run_lockstep(
        {"u": lambda ids: np.zeros((len(ids), VOCAB), np.float32)}, _text(), None, []
    )
    assert out["models"]["u"]["perplexity"] == pytest.approx(VOCAB)


def test_perfect_model_and_agreement():
    def oracle(ids):
        logits = np.full((len(ids), VOCAB), -50.0, np.float32)
        logits[np.arange(len(ids) - 1), ids[1:]] = 50.0
        return logits

    def shifted(ids):
        return np.roll(oracle(ids), 1, axis=1)

    out = run_lockstep({"ref": oracle, "bad": shifted}, _text(), "ref", [("bad", "ref")])
    assert out["models"]["ref"]["perplexity"] == pytest.approx(1.0)
    assert out["models"]["ref"]["greedy_agreement"] == 1.0
    assert out["models"]["bad"]["greedy_agreement"] == 0.0
    assert out["models"]["bad"]["perplexity"] > 1e10


def test_relative_logit_error_value():
    text = _text()
    base = lambda ids: np.ones((len(ids), VOCAB), np.float32)  # noqa: E731
    scaled = lambda ids: np.full((len(ids), VOCAB), 1.01, np.float32)  # noqa: E731
    out = run_lockstep({"a": scaled, "b": base}, text, None, [("a", "b")])
    assert out["relative_logit_error"]["a_vs_b"] == pytest.approx(
        0.01, rel=tol.FP32_DIFFERENCE_RTOL
    )


def test_nll_counts_positions_after_bos():
    # A model certain of token 0 everywhere: NLL = 0 where the target is 0, 50-ish otherwise.
    ids = np.array([[1, 0, 0, 0, 0]])
    text = EvalText(ids, 4, {})
    logits = lambda ids: np.where(np.arange(VOCAB) == 0, 0.0, -np.inf)[None].repeat(len(ids), 0)  # noqa: E731
    out = run_lockstep({"m": logits}, text, None, [])
    assert out["models"]["m"]["mean_nll"] == 0.0
    assert math.isclose(out["models"]["m"]["perplexity"], 1)


def test_windows_from_texts(tokenizer):
    docs = ["The cat sat on the mat. " * 40, "A second document follows here. " * 40]
    text = windows_from_texts(tokenizer, docs, windows=3, window_len=32, source="t")
    assert text.input_ids.shape == (3, 32)
    assert (text.input_ids[:, 0] == tokenizer.bos_token_id).all()
    assert text.scored_tokens == 3 * 31
    # Non-overlapping: window 2 continues where window 1 stopped.
    stream = np.concatenate([w[1:] for w in text.input_ids])
    first = tokenizer(docs[0], add_special_tokens=False)["input_ids"]
    assert stream[:60].tolist() == first[:60]
    with pytest.raises(Exception, match="fewer than 1000 windows"):
        windows_from_texts(tokenizer, docs, windows=1000, window_len=32, source="t")


def test_dequantized_model_matches_transformers_reload(rtn_dir):
    """The kernel-free dequantized model agrees with transformers' GPTQ reload (bf16 kernel)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rslora_deploy.evaluation.quality import dequantized_gptq_model
    from rslora_deploy.testing.tiny import example_inputs
    from rslora_deploy.testing.tokenizer import TINY_VOCAB

    ids = example_inputs(vocab=TINY_VOCAB, seq=16)
    ours = dequantized_gptq_model(rtn_dir)
    theirs = AutoModelForCausalLM.from_pretrained(rtn_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert ((a - b).norm() / b.norm()).item() < 2e-2


def test_protected_checkpoint_loads_with_8bit_module(tmp_path, tiny_dir):
    """Per-module 8-bit (dynamic) checkpoints evaluate through the dequantized path."""
    import torch
    from transformers import AutoModelForCausalLM

    from rslora_deploy.artifact import Artifact
    from rslora_deploy.config import QuantizeConfig
    from rslora_deploy.evaluation.quality import load_torch_model
    from rslora_deploy.quantizers.base import QuantizeExtras
    from rslora_deploy.stages.quantize import quantize_model

    dyn = {r"+:^model\.layers\.0\.mlp\.(gate|up)_proj$": {"bits": 8}}
    out = quantize_model(
        Artifact("hf", tiny_dir),
        tmp_path / "q",
        QuantizeConfig(method="rtn"),
        extras=QuantizeExtras(dynamic=dyn),
    ).path
    model = load_torch_model(out)
    fp = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    w8 = model.model.layers[0].mlp.up_proj.weight
    w4 = model.model.layers[0].mlp.down_proj.weight
    ref8, ref4 = fp.model.layers[0].mlp.up_proj.weight, fp.model.layers[0].mlp.down_proj.weight
    err8 = ((w8 - ref8).norm() / ref8.norm()).item()
    err4 = ((w4 - ref4).norm() / ref4.norm()).item()
    assert err8 < err4 / 8  # 8-bit: 16x finer steps than 4-bit


def test_onnx_gate_uses_the_exports_own_tolerance(caplog: pytest.LogCaptureFixture) -> None:
    """A level-4 / int4-head export states a larger parity limit; the gate reads it, not 0.02."""
    from rslora_deploy.evaluation.quality import ONNX_LOGIT_ERROR_LIMIT, _onnx_gate
    from rslora_deploy.exporters.genai.layout import PARITY_TOLERANCE

    level4 = PARITY_TOLERANCE[(4, True)]
    assert _onnx_gate(0.05, level4) == {"onnx_vs_torch_ok": True, "onnx_vs_torch_limit": level4}
    assert not caplog.records
    assert not _onnx_gate(0.05, ONNX_LOGIT_ERROR_LIMIT)["onnx_vs_torch_ok"]
    assert "limit 0.02" in caplog.text
