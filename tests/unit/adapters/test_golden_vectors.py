"""Spec section 7 golden vectors TV1-TV5, TV7 through the real reader, importers and merge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from rslora_deploy.adapters import rslora_v1
from rslora_deploy.adapters.convert import to_peft_lora
from rslora_deploy.adapters.delta import ModuleDelta
from rslora_deploy.adapters.detect import load_adapter
from rslora_deploy.adapters.layers import apply_on_the_fly
from rslora_deploy.adapters.merge_math import merge_deltas
from rslora_deploy.adapters.rslora_writer import RsloraSpec, write_checkpoint
from rslora_deploy.testing.adapters import f32 as np_f32
from rslora_deploy.testing.adapters import fake_base_model, write_peft_dir
from tests import tolerances as tol

pytestmark = pytest.mark.golden

TV1_PA = [[[1, 0, -1, 0.5], [0, 1, 0.5, -1]], [[0.5, -0.5, 0, 1], [1, 1, -1, 0]]]
TV1_PB = [[[1, 0], [0, 1], [1, -1]], [[0, 0.5], [-1, 0], [0.5, 0.5]]]
MOD = "lin"


def tv1_checkpoint(tmp_path: Path, normalization: str = "inv_sqrt_k") -> Path:
    spec = RsloraSpec(
        modules={MOD: {"d_in": 4, "d_out": 3, "layout": "linear"}},
        r=2,
        k=2,
        base_model=fake_base_model(),
        seed=None,
        generator="external",
        storage="stored",
        normalization=normalization,
    )
    v = {f"{MOD}.rslora_v_A": np_f32([1, 2]), f"{MOD}.rslora_v_B": np_f32([0.5, -1])}
    return write_checkpoint(
        tmp_path / f"tv1-{normalization}", spec, v, bases={MOD: (np_f32(TV1_PA), np_f32(TV1_PB))}
    )


def test_tv1_explicit_basis_factors_and_dw_bit_exact(tmp_path: Path, golden: dict) -> None:
    tv = golden["TV1"]
    adapter = load_adapter(tv1_checkpoint(tmp_path))
    (delta,) = adapter.deltas
    assert delta.scale == tv["s"]
    np.testing.assert_array_equal(delta.A, tv["A_tilde"])
    np.testing.assert_array_equal(delta.B, tv["B_tilde"])
    np.testing.assert_array_equal(delta.delta_weight(np.float32), np_f32(tv["dW"]))
    # the original notation: A = A~/sqrt 2, B = B~/sqrt 2, dW = (1/r) B A
    a_n, b_n = np.array(tv["A_normalized"]), np.array(tv["B_normalized"])
    np.testing.assert_allclose(0.5 * b_n @ a_n, tv["dW"], rtol=tol.F64_RTOL, atol=tol.F64_ATOL)


def test_tv1_normalization_none_doubles(tmp_path: Path, golden: dict) -> None:
    (delta,) = load_adapter(tv1_checkpoint(tmp_path, "none")).deltas
    assert delta.scale == 0.5
    np.testing.assert_array_equal(delta.delta_weight(), 2 * np.array(golden["TV1"]["dW"]))


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.lin = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _tv2_layers(golden: dict) -> tuple[nn.Linear, Conv1D]:
    w = torch.tensor(golden["TV2"]["W"], dtype=torch.float32)
    bias = torch.tensor(golden["TV2"]["bias"], dtype=torch.float32)
    lin = nn.Linear(4, 3)
    conv = Conv1D(3, 4)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(bias)
        conv.weight.copy_(w.T)
        conv.bias.copy_(bias)
    return lin, conv


def test_tv2_merge_linear_and_conv1d_bit_exact(tmp_path: Path, golden: dict) -> None:
    tv = golden["TV2"]
    lin, conv = _tv2_layers(golden)
    ckpt = tv1_checkpoint(tmp_path)
    x = torch.tensor(tv["x"], dtype=torch.float32)
    fly = apply_on_the_fly(_Holder(_tv2_layers(golden)[0]), load_adapter(ckpt).deltas)
    stats = merge_deltas(_Holder(lin), load_adapter(ckpt).deltas)
    assert torch.equal(lin.weight, torch.tensor(tv["W_merged_linear"], dtype=torch.float32))
    assert torch.equal(lin.bias, torch.tensor(tv["bias"], dtype=torch.float32))  # untouched
    assert stats[0].lost_fraction == 0.0
    assert stats[0].relative_merge_error < tol.FP32_ATOL  # only the fp32 rounding of W + dW

    conv_deltas = load_adapter(ckpt).deltas
    conv_deltas[0].layout = "conv1d"
    merge_deltas(_Holder(conv), conv_deltas)
    assert torch.equal(conv.weight, torch.tensor(tv["W_merged_conv1d"], dtype=torch.float32))
    assert torch.equal(conv.weight, lin.weight.T)

    expected = torch.tensor(tv["y_merged"], dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), expected, rtol=0, atol=tol.FP32_ATOL)
        torch.testing.assert_close(conv(x), expected, rtol=0, atol=tol.FP32_ATOL)
        torch.testing.assert_close(
            fly(x), torch.tensor(tv["y_on_the_fly"]), rtol=0, atol=tol.FP32_ATOL
        )


def test_tv3_seed_mode_dw_and_export(tmp_path: Path, golden: dict) -> None:
    tv = golden["TV3"]
    spec = RsloraSpec(
        modules={tv["module"]: {"d_in": 4, "d_out": 3, "layout": "linear"}},
        r=2,
        k=2,
        base_model=fake_base_model(),
        seed=tv["seed"],
        task_id=tv["task_id"],
    )
    v = {
        f"{tv['module']}.rslora_v_A": np_f32(tv["v_A"]),
        f"{tv['module']}.rslora_v_B": np_f32(tv["v_B"]),
    }
    ckpt = write_checkpoint(tmp_path / "tv3", spec, v)
    cfg = json.loads((ckpt / rslora_v1.CONFIG_NAME).read_text())
    assert cfg["projection"]["sha256"][tv["module"]] == {
        "A": tv["sha256_P_A"],
        "B": tv["sha256_P_B"],
    }
    assert cfg["effective_scale"] == golden["TV3_s"]
    (delta,) = load_adapter(ckpt).deltas
    np.testing.assert_allclose(delta.A, golden["TV3_A_tilde"], rtol=tol.F64_RTOL)
    np.testing.assert_allclose(delta.B, golden["TV3_B_tilde"], rtol=tol.F64_RTOL)
    np.testing.assert_allclose(delta.delta_weight(), tv["dW"], rtol=tol.F64_RTOL)
    export = golden["TV3_export_peft_lora"]
    summary = to_peft_lora(ckpt, tmp_path / "peft")
    assert summary["r"] == export["r"]
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (peft_cfg["r"], peft_cfg["lora_alpha"], peft_cfg["use_rslora"]) == (2, 2, False)
    (back,) = load_adapter(tmp_path / "peft").deltas
    np.testing.assert_allclose(back.A, export["lora_A"], rtol=tol.FP32_STORAGE_RTOL)
    np.testing.assert_allclose(back.B, export["lora_B"], rtol=tol.FP32_STORAGE_RTOL)
    np.testing.assert_allclose(back.delta_weight(), tv["dW"], rtol=tol.FP32_STORAGE_RTOL, atol=1e-9)


@pytest.mark.parametrize(("use_rslora", "key"), [(False, "dW_standard"), (True, "dW_rslora")])
def test_tv4_peft_lora(tmp_path: Path, golden: dict, use_rslora: bool, key: str) -> None:
    tv = golden["TV4"]
    path = write_peft_dir(
        tmp_path / key,
        {
            "peft_type": "LORA",
            "r": tv["r"],
            "lora_alpha": tv["lora_alpha"],
            "use_rslora": use_rslora,
        },
        {
            "base_model.model.lin.lora_A.weight": tv["lora_A"],
            "base_model.model.lin.lora_B.weight": tv["lora_B"],
        },
    )
    (delta,) = load_adapter(path).deltas
    np.testing.assert_allclose(delta.delta_weight(), tv[key], rtol=tol.F64_RTOL)


def test_tv5_peft_vera(tmp_path: Path, golden: dict) -> None:
    tv = golden["TV5"]
    path = write_peft_dir(
        tmp_path,
        {"peft_type": "VERA", "r": 2},
        {
            "base_model.vera_A": tv["vera_A"],
            "base_model.vera_B": tv["vera_B"],
            "base_model.model.lin.vera_lambda_d": tv["lambda_d"],
            "base_model.model.lin.vera_lambda_b": tv["lambda_b"],
        },
    )
    (delta,) = load_adapter(path).deltas
    delta.fit_to_layer(3, 4)
    # fp32 inputs (lambda_d = 0.1 is not exact in fp32), so compare at fp32 precision
    np.testing.assert_allclose(
        delta.delta_weight(), tv["dW"], rtol=tol.FP32_STORAGE_RTOL, atol=tol.FP32_STORAGE_ATOL
    )


def test_tv7_single_rounding_bf16_and_lost_update(golden: dict) -> None:
    tv = golden["TV7"]
    assert tv["dW"] == 2.0**-8 + 2.0**-20
    lin = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.fill_(tv["W"])
    dense = np.array([[tv["dW"]]])
    merge_deltas(_Holder(lin), [ModuleDelta("lin", "linear", 1, 1, dense=dense)])
    assert lin.weight.item() == tv["single_rounding_bf16"]
    peft_style = torch.tensor(tv["W"], dtype=torch.bfloat16) + torch.tensor(tv["dW"]).to(
        torch.bfloat16
    )
    assert float(peft_style) == tv["double_rounding_bf16"]

    lost = tv["lost_update_example"]
    lin2 = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin2.weight.fill_(lost["W"])
    (row,) = merge_deltas(
        _Holder(lin2), [ModuleDelta("lin", "linear", 1, 1, dense=np.array([[lost["dW"]]]))]
    )
    assert lin2.weight.item() == lost["bf16"]
    assert row.lost_fraction == 1.0
    assert row.relative_merge_error == pytest.approx(1.0)
