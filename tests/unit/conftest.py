"""Fixtures: a tiny random Llama saved with the real SmolLM2 tokenizer (for calibration text)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    from rslora_deploy.data.assets import default_base_dir

    return default_base_dir()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def make_tiny(directory: Path, tokenizer_dir: Path, seed: int = 0, hidden: int = 128) -> Path:
    """Tiny Llama (2 layers, SmolLM2's vocabulary so real text tokenizes) plus its tokenizer."""
    from rslora_deploy.testing.tiny import save_tiny, tiny_llama

    model = tiny_llama(hidden=hidden, layers=2, kv_heads=2, seed=seed, tie=True, vocab=49152)
    model.config.bos_token_id = 1
    model.config.eos_token_id = 2
    save_tiny(model, directory)
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer_dir / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model", tokenizer_dir)


@pytest.fixture(scope="session")
def rtn_dir(tmp_path_factory, tiny_dir) -> Path:
    """The tiny model quantized with RTN int4 g64 (shared by several tests)."""
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.config import QuantizeConfig
    from rslora_deploy.stages.quantize import quantize_model

    out = tmp_path_factory.mktemp("rtn") / "q"
    quantize_model(Artifact("hf", tiny_dir), out, QuantizeConfig(method="rtn", group_size=64))
    return out
