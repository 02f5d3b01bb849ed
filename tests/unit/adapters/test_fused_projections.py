"""Fused vs split projections (Phi-3's qkv_proj/gate_up_proj, GLM-4's gate_up_proj): an adapter
made for the other layout exits 1 naming the module and what the base holds, writing nothing."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rslora_deploy.testing.tiny import save_tiny, tiny_glm, tiny_llama, tiny_phi3
from tests.unit.cli.clean_failure import assert_clean_failure

peft = pytest.importorskip("peft")


def _peft_adapter(model: Any, targets: list[str], out: Path) -> Path:
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(model), config).save_pretrained(out)
    return out


CASES: list[tuple[str, Callable[[], Any], Callable[[], Any], list[str], tuple[str, ...]]] = [
    # (id, adapter trained on, merged into, targets, what the error line must name)
    (
        "split-q-into-phi3", tiny_llama, tiny_phi3, ["q_proj"],
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.qkv_proj", "E020"),
    ),
    (
        "fused-qkv-into-llama", tiny_phi3, tiny_llama, ["qkv_proj"],
        ("model.layers.0.self_attn.qkv_proj", "q_proj,k_proj,v_proj", "E020"),
    ),
    (
        "split-gate-into-glm4", tiny_llama, tiny_glm, ["gate_proj"],
        ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.gate_up_proj", "E020"),
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "source", "target", "modules", "needles"), CASES, ids=[c[0] for c in CASES]
)
def test_adapter_for_the_other_layout_exits_1_naming_the_module(
    name: str,
    source: Callable[[], Any],
    target: Callable[[], Any],
    modules: list[str],
    needles: tuple[str, ...],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    adapter = _peft_adapter(source(), modules, tmp_path / "adapter")
    base = save_tiny(target(), tmp_path / "base")
    out = tmp_path / "merged"
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)]
    assert_clean_failure(argv, capsys, out, *needles)
