"""Fixtures: tiny models, the tiny tokenizer and a tiny text corpus, all built offline.

Unit tests need nothing fetched: the whole session runs with ``RSLORA_DEPLOY_CACHE`` pointing at
a temporary cache that holds only the built-in text laid out as the Brown corpus
(:func:`rslora_deploy.testing.text.write_tiny_corpus`). A unit test that reached for the real
SmolLM2 or Brown corpus would fail with "run `rslora-deploy assets fetch`"; such tests belong in
tests/integration/.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache root holding only the tiny corpus, set as ``RSLORA_DEPLOY_CACHE`` for the session.

    Converting the SmolLM2 GGUF (what a build without ``--base`` does on first use) is refused,
    so a unit test that forgets ``--base`` fails at once instead of converting it for minutes.
    """
    from rslora_deploy.data import assets
    from rslora_deploy.errors import AssetError
    from rslora_deploy.testing.text import write_tiny_corpus

    def no_smollm2(force: bool = False) -> Path:
        raise AssetError("unit tests run offline on tiny models; pass --base (tests/integration)")

    root = tmp_path_factory.mktemp("cache")
    write_tiny_corpus(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RSLORA_DEPLOY_CACHE", str(root))
        # One pytest run may hold the integration suite's session-wide stage-cache override.
        patch.delenv("RSLORA_DEPLOY_STAGE_CACHE", raising=False)
        patch.setattr(assets, "fetch_smollm2", no_smollm2)
        yield root


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only the tiny tokenizer's files."""
    from rslora_deploy.testing.tokenizer import save_tiny_tokenizer

    return save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from rslora_deploy.testing.tiny import tiny_llama_dir

    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def rtn_dir(tmp_path_factory, tiny_dir) -> Path:
    """The tiny model quantized with RTN int4 g64 (shared by several tests)."""
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.config import QuantizeConfig
    from rslora_deploy.stages.quantize import quantize_model

    out = tmp_path_factory.mktemp("rtn") / "q"
    quantize_model(Artifact("hf", tiny_dir), out, QuantizeConfig(method="rtn", group_size=64))
    return out


@pytest.fixture(scope="session")
def tiny_onnx_cpu(tmp_path_factory, rtn_dir) -> Path:
    """The RTN tiny model exported for cpu-2gb (last-token logits), max_length 128."""
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.exporters.genai.builder import export_onnx
    from rslora_deploy.exporters.genai.options import GenaiExportConfig
    from rslora_deploy.profiles import load_profile

    root = tmp_path_factory.mktemp("tiny-onnx-cpu")
    art = export_onnx(
        Artifact("hf-quantized", rtn_dir),
        root / "model",
        GenaiExportConfig(max_length=128),
        load_profile("cpu-2gb"),
        root / "export.log",
    )
    return art.path
