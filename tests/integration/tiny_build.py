"""A tiny-model build run as a separate ``rslora-deploy`` process (for the resume and repro tests).

The model is a random 2-layer Llama with SmolLM2's vocabulary and tokenizer; the adapter a PEFT
LoRA on its attention projections; quantization RTN; no evaluation. Every stage runs for real
(merge, quantize, onnxruntime-genai export, verify, budget, package).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

RECIPE = """
[quantize]
method = "rtn"
[export]
max_length = 128
[eval]
enabled = false
"""
ROOT = Path(__file__).resolve().parents[2]


def make_inputs(directory: Path, hidden: int = 256) -> tuple[Path, Path, Path]:
    """``(base, adapter, recipe)`` under ``directory``."""
    from rslora_deploy.data.assets import default_base_dir
    from rslora_deploy.testing.adapters import write_peft_dir
    from rslora_deploy.testing.tiny import save_tiny, tiny_llama

    model = tiny_llama(hidden=hidden, layers=2, kv_heads=2, seed=0, tie=True, vocab=49152)
    base = save_tiny(model, directory / "base")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(default_base_dir() / name, base / name)
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(2):
        for proj in ("q_proj", "o_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((4, hidden)) * 0.05
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((hidden, 4)) * 0.05
    adapter = write_peft_dir(
        directory / "adapter",
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj"],
         "fan_in_fan_out": False, "use_rslora": False, "bias": "none"},
        tensors,
    )  # fmt: skip
    recipe = directory / "recipe.toml"
    recipe.write_text(RECIPE)
    return base, adapter, recipe


def build_argv(base: Path, adapter: Path, recipe: Path, out: Path, *flags: str) -> list[str]:
    """The ``rslora-deploy build`` command line of the tiny build."""
    return [
        sys.executable, "-m", "rslora_deploy.cli.app", "build", "--profile", "t4-2gb",
        "--base", str(base), "--adapter", str(adapter), "--recipe", str(recipe),
        "--out", str(out), *flags,
    ]  # fmt: skip


def build_env(stage_cache: Path) -> dict[str, str]:
    """The environment of a build process: this checkout first, its own stage cache."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RSLORA_DEPLOY_STAGE_CACHE": str(stage_cache),
        "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2"),
    }


def run_build(argv: list[str], env: dict[str, str], log: Path) -> subprocess.CompletedProcess:
    """Run a build to completion, stderr into ``log``; returns the finished process."""
    with log.open("w") as handle:
        return subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=handle, check=False)
