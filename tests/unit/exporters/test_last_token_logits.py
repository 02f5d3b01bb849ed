"""Last-token logits: the shipped graph's prefill returns one position, generation is unchanged.

Tiny Llama- and Qwen2-shaped models go through the real builder and the real onnxruntime-genai;
the reference is the same checkpoint exported with every position's logits.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from rslora_deploy.last_token_logits import full_logits_graph, logits_positions

PROMPTS = (
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "The committee met on Tuesday to discuss the budget for the coming year and",
    "1, 2, 3, 4,",
)


def _export(quantized: Path, out: Path, last_token: bool) -> Path:
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.exporters.genai.builder import export_onnx
    from rslora_deploy.exporters.genai.options import GenaiExportConfig
    from rslora_deploy.profiles import load_profile

    art = export_onnx(
        Artifact("hf-quantized", quantized),
        out,
        GenaiExportConfig(last_token_logits=last_token, max_length=128),
        load_profile("cpu-2gb"),
        out.parent / f"{out.name}.log",
    )
    return art.path


@pytest.fixture(scope="module")
def qwen2_rtn(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A tiny Qwen2 (biases on q/k/v) with SmolLM2's vocabulary, RTN int4 g64."""
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.config import QuantizeConfig
    from rslora_deploy.stages.quantize import quantize_model
    from rslora_deploy.testing.tiny import save_tiny, tiny_qwen2

    root = tmp_path_factory.mktemp("qwen2")
    model = tiny_qwen2(hidden=128, layers=2, kv_heads=2, vocab=49152)
    save_tiny(model, root / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_dir / name, root / "hf" / name)
    out = root / "q"
    quantize_model(Artifact("hf", root / "hf"), out, QuantizeConfig(method="rtn", group_size=64))
    return out


@pytest.fixture(scope="module")
def llama_exports(tmp_path_factory: pytest.TempPathFactory, rtn_dir: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llama-onnx")
    return _export(rtn_dir, root / "last", True), _export(rtn_dir, root / "full", False)


def _vocab(onnx_dir: Path) -> int:
    import json

    return int(json.loads((onnx_dir / "genai_config.json").read_text())["model"]["vocab_size"])


def _prefill_logits_shape_and_greedy(onnx_dir: Path, prompt: str) -> tuple[tuple[int, ...], list]:
    import onnxruntime_genai as og

    model = og.Model(str(onnx_dir))
    ids = og.Tokenizer(model).encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 12)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    shape = tuple(generator.get_output("logits").shape)
    while not generator.is_done():
        generator.generate_next_token()
    return shape, list(generator.get_sequence(0))


def test_llama_prefill_returns_one_position_and_greedy_is_identical(
    llama_exports: tuple[Path, Path],
) -> None:
    last, full = llama_exports
    assert logits_positions(last) == "last"
    assert logits_positions(full) == "all"
    for prompt in PROMPTS:
        shape_last, tokens_last = _prefill_logits_shape_and_greedy(last, prompt)
        shape_full, tokens_full = _prefill_logits_shape_and_greedy(full, prompt)
        assert shape_last == (1, 1, _vocab(last))
        assert shape_full[1] > 1
        assert tokens_last == tokens_full, prompt


def test_full_logits_graph_matches_the_full_export(
    llama_exports: tuple[Path, Path], tmp_path: Path
) -> None:
    """Evaluation reads every position of the shipped weights; nothing is written there."""
    from rslora_deploy.evaluation.quality import onnx_logits
    from rslora_deploy.exporters.genai.builder import cpu_view

    last, full = llama_exports
    before = sorted(p.name for p in last.iterdir())
    assert full_logits_graph(full) is None
    assert full_logits_graph(last) is not None
    ids = np.arange(3, 40, dtype=np.int64)
    from_last, from_full = onnx_logits(last)(ids), onnx_logits(full)(ids)
    assert from_last.shape == (len(ids), _vocab(last))
    np.testing.assert_allclose(from_last, from_full, rtol=0, atol=1e-5)
    # Through a cpu_view's symlinks too (how the build evaluates a CUDA-target package).
    view = cpu_view(last, tmp_path / "view")
    np.testing.assert_allclose(onnx_logits(view)(ids), from_full, rtol=0, atol=1e-5)
    assert sorted(p.name for p in last.iterdir()) == before


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_estimate_logits_term_is_vocab_io_batch(
    arch: str,
    llama_exports: tuple[Path, Path],
    rtn_dir: Path,
    qwen2_rtn: Path,
    tmp_path: Path,
) -> None:
    from rslora_deploy.model_view import model_view
    from rslora_deploy.profiles import load_profile
    from rslora_deploy.stages.budget import estimate

    if arch == "llama":
        onnx_dir, quantized = llama_exports[0], rtn_dir
    else:
        onnx_dir, quantized = _export(qwen2_rtn, tmp_path / "qwen2", True), qwen2_rtn
    shape, _ = _prefill_logits_shape_and_greedy(onnx_dir, PROMPTS[0])
    view = model_view(quantized)
    assert shape == (1, 1, view.vocab)
    assert view.model_type == arch
    profile = load_profile("cpu-2gb")
    for batch in (1, 4):
        report = estimate(onnx_dir, view, profile.model_copy(update={"batch_size": batch}))
        assert report["inputs"]["logits_positions"] == "last"
        assert report["terms_bytes"]["logits"] == view.vocab * 4 * batch  # vocab x io x batch
