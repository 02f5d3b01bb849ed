"""One model at a time: the memory bound, and the numbers against a float64 in-memory reference."""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import numpy as np
import pytest

from rslora_deploy.evaluation import metrics, sequence
from rslora_deploy.evaluation.quality import EvalText
from rslora_deploy.evaluation.sequence import SurvivalSpec, evaluate_sequence
from rslora_deploy.evaluation.survival import SurvivalStats

VOCAB = 3000
LENGTH = 48
WINDOWS = 4


class FakeModel:
    """A logit function with a weight buffer (its "model memory") that counts live instances.

    Logits are shared noise per window (seeded by the window's tokens) plus ``scale`` times the
    model's own noise, so the models are correlated the way base / merged / quantized are.
    ``exclusive`` models assert, when called, that no other exclusive model is alive.
    """

    live = 0
    max_live = 0

    def __init__(self, seed: int, scale: float, weight_bytes: int, exclusive: bool = True) -> None:
        self.seed, self.scale, self.exclusive = seed, scale, exclusive
        self.weight = np.ones(weight_bytes // 4, dtype=np.float32)
        if exclusive:
            FakeModel.live += 1
            FakeModel.max_live = max(FakeModel.max_live, FakeModel.live)

    def __del__(self) -> None:
        if self.exclusive:
            FakeModel.live -= 1

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        assert not self.exclusive or FakeModel.live == 1, "another model is still in memory"
        key = int(ids.sum()) + 7 * int(ids[1])
        logits = np.random.default_rng(key).standard_normal((len(ids), VOCAB), np.float32)
        logits *= 3
        own = np.random.default_rng([key, self.seed])
        for row in logits:  # row by row: the fake model's own temporaries stay small
            row += self.scale * own.standard_normal(VOCAB, np.float32)
        return logits


def _text(seed: int) -> EvalText:
    ids = np.random.default_rng(seed).integers(0, VOCAB, size=(WINDOWS, LENGTH))
    return EvalText(ids, WINDOWS * (LENGTH - 1), {})


MODELS = {"merged": (1, 0.3), "quantized": (2, 0.5), "base": (3, 0.6), "onnx": (4, 0.5)}


def _loaders(weight_bytes: int, calls: list[str]) -> dict[str, Any]:
    def loader(name: str) -> Any:
        calls.append(name)
        return FakeModel(*MODELS[name], weight_bytes)

    return {name: (lambda name=name: loader(name)) for name in MODELS}


PAIRS = [("quantized", "merged"), ("onnx", "quantized"), ("onnx", "merged")]


@pytest.fixture(autouse=True)
def _reset_counts() -> None:
    FakeModel.live = FakeModel.max_live = 0


def test_each_model_loaded_once_and_alone(tmp_path):
    calls: list[str] = []
    spec = SurvivalSpec("base", "merged", "onnx", _text(1))
    evaluate_sequence(_loaders(1 << 16, calls), _text(0), "merged", PAIRS, [spec], tmp_path)
    assert calls == list(MODELS)
    assert FakeModel.max_live == 1
    assert list(tmp_path.iterdir()) == []  # the spill is removed


def test_memory_is_one_model_plus_one_window(monkeypatch):
    """Peak traced memory: one model + one window's logits + chunk temporaries (< 2 windows)."""
    monkeypatch.setattr(sequence, "CHUNK_ELEMENTS", 1 << 13)  # chunk temporaries stay small
    model_bytes = 8 << 20
    window_bytes = LENGTH * VOCAB * 4
    text, domain = _text(0), _text(1)
    spec = SurvivalSpec("base", "merged", "onnx", domain)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        evaluate_sequence(_loaders(model_bytes, []), text, "merged", PAIRS, [spec])
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    # Holding every model (the old lockstep) would need 4 * model_bytes alone.
    assert peak < model_bytes + 2 * window_bytes, (peak, model_bytes, window_bytes)


def _reference(text: EvalText, domain: EvalText) -> dict[str, Any]:
    """Everything in memory and in float64, the way the evaluation used to compute it."""
    models = {name: FakeModel(*args, 4, exclusive=False) for name, args in MODELS.items()}
    nll = dict.fromkeys(models, 0.0)
    agree = dict.fromkeys(models, 0)
    diff2 = dict.fromkeys(PAIRS, 0.0)
    ref2 = dict.fromkeys(PAIRS, 0.0)
    for ids in text.input_ids:
        logits = {name: fn(ids) for name, fn in models.items()}
        for name, value in logits.items():
            nll[name] += metrics.target_nll(metrics.log_softmax(value[:-1]), ids[1:])
            agree[name] += int((value[:-1].argmax(-1) == logits["merged"][:-1].argmax(-1)).sum())
        for a, b in PAIRS:
            diff2[(a, b)] += float(np.square(logits[a] - logits[b], dtype=np.float64).sum())
            ref2[(a, b)] += float(np.square(logits[b], dtype=np.float64).sum())
    stats = SurvivalStats()
    for ids in domain.input_ids:
        b, m, q = (models[n](ids) for n in ("base", "merged", "onnx"))
        stats.add(b, m, q, ignore_last=True, targets=ids[1:])
    return {
        "perplexity": {n: math.exp(v / text.scored_tokens) for n, v in nll.items()},
        "agreement": {n: v / text.scored_tokens for n, v in agree.items()},
        "error": {f"{a}_vs_{b}": math.sqrt(diff2[(a, b)] / ref2[(a, b)]) for a, b in PAIRS},
        "survival": stats.summary(),
    }


def test_float32_chunks_match_float64_reference(monkeypatch):
    monkeypatch.setattr(sequence, "CHUNK_ELEMENTS", 5 * VOCAB + 7)  # uneven last chunk
    text, domain = _text(0), _text(1)
    expected = _reference(text, domain)
    spec = SurvivalSpec("base", "merged", "onnx", domain)
    out = evaluate_sequence(_loaders(4, []), text, "merged", PAIRS, [spec])
    for name, model in out["models"].items():
        assert model["perplexity"] == pytest.approx(expected["perplexity"][name], rel=1e-6)
        assert model["greedy_agreement"] == expected["agreement"][name]
    assert out["relative_logit_error"] == pytest.approx(expected["error"], rel=1e-6)
    got = spec.stats.summary()
    for key in ("effect_kl_merged_vs_base", "residual_kl_merged_vs_quantized", "retained"):
        assert got[key] == pytest.approx(expected["survival"][key], rel=1e-5), key
    assert got["nll"] == pytest.approx(expected["survival"]["nll"], rel=1e-6)
    assert got["positions"] == expected["survival"]["positions"] == WINDOWS * (LENGTH - 1)


def test_survival_on_main_windows_and_unknown_names():
    text = _text(0)
    spec = SurvivalSpec("base", "merged", "quantized")
    out = evaluate_sequence(_loaders(4, []), text, None, [], [spec])
    assert "greedy_agreement" not in out["models"]["base"]
    assert spec.stats.positions == WINDOWS * (LENGTH - 1)
    with pytest.raises(Exception, match="not among"):
        evaluate_sequence(_loaders(4, []), text, None, [("onnx", "gptq")])


def test_log_softmax32_matches_float64():
    logits = np.random.default_rng(0).standard_normal((7, 500)).astype(np.float32) * 20
    assert metrics.log_softmax32(logits).dtype == np.float32
    np.testing.assert_allclose(
        metrics.log_softmax32(logits), metrics.log_softmax(logits), rtol=1e-6, atol=1e-5
    )
