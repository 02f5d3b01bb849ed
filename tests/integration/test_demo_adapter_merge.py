"""The committed demo adapter merges into the real SmolLM2 and lowers the loss on its domain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rslora_deploy.adapters import demo_adapter_dir


@pytest.mark.slow
def test_demo_adapter_merges_into_smollm2_and_lowers_loss(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rslora_deploy.adapters.training import mean_loss, token_windows
    from rslora_deploy.config import AdapterConfig, MergeConfig
    from rslora_deploy.data.assets import default_base_dir
    from rslora_deploy.data.corpus import iter_documents
    from rslora_deploy.stages.merge import merge_adapter

    base = default_base_dir()
    art = merge_adapter(
        base, demo_adapter_dir(), tmp_path / "merged", MergeConfig(), AdapterConfig()
    )
    report = json.loads((art.path / "merge_report.json").read_text())
    assert report["base_check"]["weights_match"] is True
    assert report["summary"]["merged_weights"] == 210
    tok = AutoTokenizer.from_pretrained(art.path)
    genre = json.loads((demo_adapter_dir() / "rslora_config.json").read_text())["task_id"]
    docs = [d.text for d in iter_documents("evaluation", genre=genre.removeprefix("brown-"))]
    windows = token_windows(tok, docs, 128)[:8]
    torch.set_num_threads(1)
    base_loss = mean_loss(AutoModelForCausalLM.from_pretrained(base), windows)
    merged_loss = mean_loss(AutoModelForCausalLM.from_pretrained(art.path), windows)
    assert merged_loss < base_loss - 0.01
