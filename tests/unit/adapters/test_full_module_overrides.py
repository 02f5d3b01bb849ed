"""PEFT modules_to_save / trainable_token_indices with allow_full_module_overrides (spec 6.1
rejections: E070 unless allowed, "then copy tensors with exact shape and dtype checks")."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import tolerances as tol

peft = pytest.importorskip("peft")

from rslora_deploy.adapters.detect import load_adapter  # noqa: E402
from rslora_deploy.adapters.merge_math import apply_overrides, merge_deltas  # noqa: E402
from rslora_deploy.cli.app import main  # noqa: E402
from rslora_deploy.config import AdapterConfig, MergeConfig  # noqa: E402
from rslora_deploy.errors import RsloraDeployError  # noqa: E402
from rslora_deploy.stages.merge import merge_adapter  # noqa: E402
from rslora_deploy.testing.tiny import example_inputs, save_tiny, tiny_llama  # noqa: E402

ADAPTER_FILE = "adapter_model.safetensors"


def _randomize(model: Any, seed: int) -> None:
    """Random LoRA factors and 'trained' override tensors (as after some training steps)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(p in name for p in ("lora_", "vera_lambda", "modules_to_save", "tokens_delta")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def _peft(base: Any, config: Any, out: Path) -> Any:
    wrapped = peft.get_peft_model(copy.deepcopy(base), config)
    _randomize(wrapped, 1)
    wrapped.save_pretrained(out)
    return wrapped


CASES: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
    ("lm_head+norm", tiny_llama, lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head", "norm"])),
    ("tokens-list", tiny_llama, lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[3, 5, 9])),
    ("tokens-dict-tied", lambda: tiny_llama(tie=True), lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["k_proj"],
        trainable_token_indices={"embed_tokens": [4, 17]})),
    ("vera-lm_head", tiny_llama, lambda: peft.VeraConfig(
        r=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
]  # fmt: skip


@pytest.mark.parametrize(("name", "factory", "make_config"), CASES, ids=[c[0] for c in CASES])
def test_overrides_match_peft_merge_and_unload(
    name: str, factory: Callable[[], Any], make_config: Callable[[], Any], tmp_path: Path
) -> None:
    base = factory()
    wrapped = _peft(base, make_config(), tmp_path / "adapter")
    ids = example_inputs()
    with torch.no_grad():
        peft_logits = wrapped(input_ids=ids).logits
    reference = wrapped.merge_and_unload()

    adapter = load_adapter(tmp_path / "adapter", allow_full_module_overrides=True)
    assert adapter.overrides
    ours = copy.deepcopy(base)
    rows = apply_overrides(ours, adapter.overrides, adapter.deltas)
    merge_deltas(ours, adapter.deltas)
    assert all(r["max_abs_change"] > 0 for r in rows)

    ref_state = reference.state_dict()
    for key, tensor in ours.state_dict().items():
        diff = (tensor - ref_state[key]).abs().max().item()
        assert diff <= tol.FP32_ATOL, f"{key}: {diff}"
    with torch.no_grad():
        ours_logits = ours(input_ids=ids).logits
        ref_logits = reference(input_ids=ids).logits
        base_logits = base(input_ids=ids).logits
    assert (ours_logits - ref_logits).abs().max().item() <= tol.FP32_ATOL
    assert (ours_logits - peft_logits).abs().max().item() <= tol.FP32_LOGITS_RTOL
    assert (ours_logits - base_logits).abs().max().item() > 1e-3
    if "tied" in name:  # PEFT ties the lm_head's token adapter to the embedding's
        assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()


def test_saved_keys_are_what_the_importer_expects(tmp_path: Path) -> None:
    """Guards the layout read from peft 0.21: modules_to_save.<adapter> is stripped on save."""
    _peft(tiny_llama(), CASES[0][2](), tmp_path / "a")
    keys = set(load_file(str(tmp_path / "a" / ADAPTER_FILE)))
    assert "base_model.model.lm_head.weight" in keys
    assert "base_model.model.model.norm.weight" in keys
    assert not any("modules_to_save" in k for k in keys)
    adapter = load_adapter(tmp_path / "a", allow_full_module_overrides=True)
    targets = {o.target for o in adapter.overrides}
    # PEFT's endswith rule: "norm" also selects every input_/post_attention_layernorm.
    assert {
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.1.post_attention_layernorm.weight",
    } <= targets
    assert len(adapter.deltas) == 4


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Any, Path, Path, Any]:
    base = tiny_llama()
    base_dir = save_tiny(base, tmp_path / "base")
    wrapped = _peft(base, CASES[0][2](), tmp_path / "adapter")
    return base, base_dir, tmp_path / "adapter", wrapped


def test_stage_copies_and_reports(setup: tuple[Any, Path, Path, Any], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base, base_dir, adapter_dir, wrapped = setup
    reference = wrapped.merge_and_unload()
    art = merge_adapter(
        base_dir,
        adapter_dir,
        tmp_path / "out",
        MergeConfig(),
        AdapterConfig(allow_full_module_overrides=True),
    )
    report = json.loads((art.path / "merge_report.json").read_text())
    copied = {row["tensor"]: row for row in report["overrides"]}
    assert copied["lm_head.weight"]["kind"] == "modules_to_save"
    assert copied["lm_head.weight"]["shape"] == [128, 64]
    assert copied["lm_head.weight"]["dtype"] == "F32"
    assert "model.norm.weight" in copied
    merged = AutoModelForCausalLM.from_pretrained(art.path)
    ids = example_inputs()
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max()
    assert diff.item() <= tol.FP32_ATOL


def test_without_the_flag_is_e070_naming_it(
    setup: tuple[Any, Path, Path, Any], tmp_path: Path, capsys: Any
) -> None:
    _, base_dir, adapter_dir, _ = setup
    with pytest.raises(RsloraDeployError) as info:
        merge_adapter(base_dir, adapter_dir, tmp_path / "out", MergeConfig(), AdapterConfig())
    assert info.value.code == "E070"
    assert "--allow-full-module-overrides" in info.value.message
    assert "modules_to_save" in info.value.message
    assert not (tmp_path / "out").exists()
    out = tmp_path / "cli-out"
    code = main(
        ["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out)]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert lines[-1].startswith("error E070:")
    assert "--allow-full-module-overrides" in lines[-1]
    assert not out.exists()
    code = main(
        [
            "merge",
            "--base",
            str(base_dir),
            "--adapter",
            str(adapter_dir),
            "--out",
            str(out),
            "--allow-full-module-overrides",
        ]
    )
    assert code == 0
    assert (out / "model.safetensors").is_file()


def _edit_adapter(adapter_dir: Path, key: str, value: torch.Tensor) -> None:
    path = adapter_dir / ADAPTER_FILE
    tensors = load_file(str(path))
    tensors[key] = value
    save_file(tensors, str(path))


@pytest.mark.parametrize(("value", "code", "needle"), [
    (torch.zeros(127, 64), "E022", "shape [127, 64]"),
    (torch.zeros(128, 64, dtype=torch.float16), "E024", "saved as F16 but the base tensor is F32"),
])  # fmt: skip
def test_bad_override_is_refused_and_nothing_written(
    setup: tuple[Any, Path, Path, Any], tmp_path: Path, value: torch.Tensor, code: str, needle: str
) -> None:
    _, base_dir, adapter_dir, _ = setup
    _edit_adapter(adapter_dir, "base_model.model.lm_head.weight", value)
    with pytest.raises(RsloraDeployError) as info:
        merge_adapter(
            base_dir,
            adapter_dir,
            tmp_path / "out",
            MergeConfig(),
            AdapterConfig(allow_full_module_overrides=True),
        )
    assert info.value.code == code
    assert needle in info.value.message
    assert "lm_head.weight" in info.value.message
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_token_rows_must_match_the_indices(tmp_path: Path) -> None:
    _peft(tiny_llama(), CASES[1][2](), tmp_path / "a")
    _edit_adapter(
        tmp_path / "a",
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
        torch.zeros(2, 64),
    )
    with pytest.raises(RsloraDeployError) as info:
        load_adapter(tmp_path / "a", allow_full_module_overrides=True)
    assert info.value.code == "E022"
    assert "one row per trainable_token_indices entry" in info.value.message


def test_token_ids_beyond_the_vocabulary(tmp_path: Path) -> None:
    big = tiny_llama(vocab=160)
    _peft(
        big,
        peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[150]),
        tmp_path / "a",
    )
    adapter = load_adapter(tmp_path / "a", allow_full_module_overrides=True)
    with pytest.raises(RsloraDeployError) as info:
        apply_overrides(tiny_llama(), adapter.overrides, adapter.deltas)
    assert info.value.code == "E022"
    assert "ids up to 150" in info.value.message


def test_tied_lm_head_copy_needs_untie(tmp_path: Path) -> None:
    base = tiny_llama(tie=True)
    _peft(
        base,
        peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        tmp_path / "a",
    )
    adapter = load_adapter(tmp_path / "a", allow_full_module_overrides=True)
    with pytest.raises(RsloraDeployError) as info:
        apply_overrides(copy.deepcopy(base), adapter.overrides, adapter.deltas)
    assert info.value.code == "E050"
    model = copy.deepcopy(base)
    apply_overrides(model, adapter.overrides, adapter.deltas, untie=True)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert model.config.tie_word_embeddings is False


def test_cli_build_passes_the_flag(monkeypatch: Any, tmp_path: Path) -> None:
    import rslora_deploy.api
    from rslora_deploy.errors import ConfigError

    seen = []

    def fake_build(config: Any, **_: Any) -> None:
        seen.append(config)
        raise ConfigError("stop here")

    monkeypatch.setattr(rslora_deploy.api, "build", fake_build)
    args = ["build", "--profile", "t4-2gb", "--out", str(tmp_path / "pkg")]
    assert main(args) == 1
    assert main([*args, "--allow-full-module-overrides"]) == 1
    assert [c.adapter.allow_full_module_overrides for c in seen] == [False, True]
