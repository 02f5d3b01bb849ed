"""The tiny model and tokenizer go through the real onnxruntime-genai builder and generate.

Nothing is fetched: the model comes from a config, the tokenizer is trained in memory
(rslora_deploy.testing.tokenizer), and onnxruntime-genai loads both as it loads SmolLM2.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def genai_dir(tmp_path_factory: pytest.TempPathFactory, rtn_dir: Path) -> Path:
    """The tiny RTN checkpoint exported for t4-2gb (CUDA target) and viewed for the CPU."""
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.exporters.genai.builder import cpu_view, export_onnx
    from rslora_deploy.exporters.genai.options import GenaiExportConfig
    from rslora_deploy.profiles import load_profile

    root = tmp_path_factory.mktemp("genai")
    art = export_onnx(
        Artifact("hf-quantized", rtn_dir),
        root / "onnx",
        GenaiExportConfig(),
        load_profile("t4-2gb"),
        root / "export.log",
    )
    return cpu_view(art.path, root / "cpu")


def test_tiny_export_generates_with_the_tiny_tokenizer(genai_dir: Path) -> None:
    from rslora_deploy.exporters.base import DEFAULT_PROMPT
    from rslora_deploy.exporters.genai.smoke import smoke_generate

    out = smoke_generate(genai_dir, max_new_tokens=8, max_length=64)
    assert out["new_tokens"] == 8
    assert out["text"].startswith(DEFAULT_PROMPT)
    assert len(out["text"]) > len(DEFAULT_PROMPT)


def test_genai_tokenizer_matches_transformers_and_the_vocab(genai_dir: Path, tokenizer) -> None:
    import json

    import onnxruntime_genai as og

    from rslora_deploy.testing.text import TEXT
    from rslora_deploy.testing.tokenizer import TINY_VOCAB

    config = json.loads((genai_dir / "genai_config.json").read_text())["model"]
    assert config["vocab_size"] == TINY_VOCAB
    og_tokenizer = og.Tokenizer(og.Model(str(genai_dir)))
    sample = TEXT[:400]
    ids = list(og_tokenizer.encode(sample))
    assert ids == tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert max(ids) < TINY_VOCAB
    assert og_tokenizer.decode(ids) == sample
