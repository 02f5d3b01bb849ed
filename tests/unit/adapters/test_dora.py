"""DoRA (Liu et al. 2024, arXiv 2402.09353) from real PEFT adapters on tiny models.

Our import + merge must equal PEFT's own ``merge_and_unload()`` weight for weight (fp32), and the
merged model's logits PEFT's unmerged forward, for non-square Llama layers, GPT-2's fused Conv1D
(``fan_in_fan_out``), an embedding target and ``use_rslora``; each with the magnitude vector
perturbed away from its initial norm so a merge that dropped it (or took the norm over the wrong
axis) is caught. Bad magnitude vectors are refused naming the tensor.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import tolerances as tol

peft = pytest.importorskip("peft")

from safetensors.torch import load_file, save_file  # noqa: E402

from rslora_deploy.adapters.detect import load_adapter  # noqa: E402
from rslora_deploy.adapters.layers import apply_on_the_fly  # noqa: E402
from rslora_deploy.adapters.merge_math import merge_deltas, stats_as_dicts  # noqa: E402
from rslora_deploy.errors import RsloraDeployError  # noqa: E402
from rslora_deploy.testing.tiny import example_inputs, tiny_gpt2, tiny_llama  # noqa: E402

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
    (
        "llama-all-linear",
        tiny_llama,
        lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=LLAMA),
    ),
    (
        "llama-rslora-embedding",
        tiny_llama,
        lambda: peft.LoraConfig(
            r=4,
            lora_alpha=8,
            use_dora=True,
            use_rslora=True,
            target_modules=["embed_tokens", "q_proj", "down_proj"],
        ),
    ),
    (
        "gpt2-conv1d",
        tiny_gpt2,
        lambda: peft.LoraConfig(
            r=4,
            lora_alpha=4,
            use_dora=True,
            target_modules=["c_attn", "c_proj", "c_fc"],
            fan_in_fan_out=True,
        ),
    ),
]


def _dora_adapter(base: Any, config: Any, directory: Path, seed: int = 3) -> Any:
    """Wrap a copy with PEFT, move factors and magnitudes off their init, save; return it."""
    wrapped = peft.get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_magnitude_vector" in name:  # +-30 % around the initial row norms
                param.mul_(1 + 0.3 * (2 * torch.rand(param.shape, generator=gen) - 1))
            elif "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    wrapped.save_pretrained(directory)
    return wrapped


@pytest.mark.parametrize(("name", "factory", "make_config"), CASES, ids=[c[0] for c in CASES])
def test_dora_merge_equals_peft(
    name: str, factory: Callable[[], Any], make_config: Callable[[], Any], tmp_path: Path
) -> None:
    base = factory()
    wrapped = _dora_adapter(base, make_config(), tmp_path)
    ids = example_inputs()
    with torch.no_grad():
        peft_logits = wrapped(input_ids=ids).logits
    reference = wrapped.merge_and_unload()

    adapter = load_adapter(tmp_path)
    assert all(d.magnitude is not None for d in adapter.deltas)
    ours = copy.deepcopy(base)
    stats = merge_deltas(ours, adapter.deltas)
    ref_state = reference.state_dict()
    for key, tensor in ours.state_dict().items():
        diff = (tensor - ref_state[key]).abs().max().item()
        assert diff <= tol.FP32_ATOL, f"{key}: max diff {diff}"
    rows = stats_as_dicts(stats)
    # The magnitudes were moved +-30 % off the row norms: every module's rows get different factors.
    for row in rows:
        low, high = row["magnitude_factor"]
        assert high - low > 0.1, row["module"]

    fly = apply_on_the_fly(copy.deepcopy(base), load_adapter(tmp_path).deltas)
    with torch.no_grad():
        merged_logits = ours(input_ids=ids).logits
        fly_logits = fly(input_ids=ids).logits
        base_logits = base(input_ids=ids).logits
    scale = 1 + peft_logits.abs().max().item()
    assert (merged_logits - peft_logits).abs().max().item() <= tol.FP32_LOGITS_RTOL * scale
    assert (fly_logits - peft_logits).abs().max().item() <= tol.FP32_LOGITS_RTOL * scale
    assert (base_logits - peft_logits).abs().max().item() > 1e-3  # the adapter does something


def test_dropping_the_magnitude_would_be_caught(tmp_path: Path) -> None:
    """The same factors without DoRA's rescaling give a measurably different weight."""
    base = tiny_llama()
    wrapped = _dora_adapter(base, CASES[0][2](), tmp_path)
    reference = wrapped.merge_and_unload()
    plain = load_adapter(tmp_path).deltas
    for delta in plain:
        delta.magnitude = None
    ours = copy.deepcopy(base)
    merge_deltas(ours, plain)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert (ours.state_dict()[key] - reference.state_dict()[key]).abs().max().item() > 1e-3


def _corrupt(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _first_magnitude(tensors: dict[str, torch.Tensor]) -> str:
    return sorted(k for k in tensors if k.endswith("lora_magnitude_vector"))[0]


BAD = {
    "wrong-shape": (
        lambda t: t.__setitem__(_first_magnitude(t), t[_first_magnitude(t)][:-1].clone()),
        "expected",
    ),
    "zero-entry": (lambda t: t[_first_magnitude(t)].__setitem__(0, 0.0), "zero"),
    "non-finite": (lambda t: t[_first_magnitude(t)].__setitem__(1, float("nan")), "NaN"),
    "missing": (lambda t: t.pop(_first_magnitude(t)), "no lora_magnitude_vector"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_magnitude_is_refused_naming_the_tensor(case: str, tmp_path: Path) -> None:
    base = tiny_llama()
    _dora_adapter(base, CASES[0][2](), tmp_path)
    edit, words = BAD[case]
    _corrupt(tmp_path, edit)
    with pytest.raises(RsloraDeployError) as err:
        merge_deltas(copy.deepcopy(base), load_adapter(tmp_path).deltas)
    message = str(err.value)
    assert words in message
    assert "layers.0.mlp.down_proj" in message  # the first magnitude, sorted by key


def test_magnitude_without_use_dora_is_refused(tmp_path: Path) -> None:
    _dora_adapter(tiny_llama(), CASES[0][2](), tmp_path)
    config_path = tmp_path / "adapter_config.json"
    cfg = json.loads(config_path.read_text())
    cfg["use_dora"] = False
    config_path.write_text(json.dumps(cfg))
    with pytest.raises(RsloraDeployError, match="use_dora=false"):
        load_adapter(tmp_path)
