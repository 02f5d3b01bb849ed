"""RS-LoRA v1 with a DoRA magnitude (our extension, docs/rslora-format.md "DoRA magnitude").

The golden case (tests/golden/rslora-dora-golden.json) is TV3's seed-mode adapter (seed 20240601,
task "demo", 3 x 4, r = k = 2, s = 1/4) with a magnitude m, merged into TV2's base weight W. Its
values are pinned from an independent float64 numpy reference written here from the formulas
(P~ from the pinned RSG-1 numerators, not from rsg.py):

    A~ = sum_l v_A[l] P~_A[l],  B~ = sum_l v_B[l] P~_B[l],  dW = s B~ A~
    n_i = ||(W + dW)[i, :]||_2,  W' = (m / n) * (W + dW)      (per logical output row)

The reference must reproduce the JSON at float64 precision; the reader + merge (float32 factors,
float32 W + dW, float64 norm, one rounding) must reproduce it at float32 precision, as a Linear,
as a Conv1D (stored transposed) and as an ``out_slice`` of a wider weight, merged and on the fly,
and after export to PEFT DoRA. Bad magnitudes are refused by the reader with PEFT DoRA's classes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from rslora_deploy.adapters import rslora_v1
from rslora_deploy.adapters.convert import to_peft_lora
from rslora_deploy.adapters.detect import load_adapter
from rslora_deploy.adapters.layers import apply_on_the_fly
from rslora_deploy.adapters.merge_math import merge_deltas, stats_as_dicts
from rslora_deploy.adapters.rslora_writer import RsloraSpec, write_checkpoint
from rslora_deploy.errors import NonFiniteError, RsloraDeployError, ShapeMismatchError
from rslora_deploy.testing.adapters import f32, fake_base_model
from tests import tolerances as tol

GOLDEN_PATH = Path(__file__).resolve().parents[2] / "golden" / "rslora-dora-golden.json"
GOLDEN: dict[str, Any] = json.loads(GOLDEN_PATH.read_text())


def reference_merge(
    case: dict[str, Any], w: np.ndarray, out_slice: list[int] | None = None
) -> dict[str, Any]:
    """The float64 DoRA merge of the golden adapter into ``w`` (linear layout, d_out x d_in)."""
    p_a = np.array(case["P_A_numerators"], dtype=np.float64) * 2.0**-24  # (k, r, d_in)
    p_b = np.array(case["P_B_numerators"], dtype=np.float64) * 2.0**-24  # (k, d_out, r)
    a_tilde = np.einsum("l,lij->ij", np.array(case["v_A"], np.float64), p_a)
    b_tilde = np.einsum("l,lij->ij", np.array(case["v_B"], np.float64), p_b)
    scale = case["alpha"] / case["r"] / case["k"]  # alpha_over_r, inv_sqrt_k
    dw = scale * (b_tilde @ a_tilde)
    w = np.array(w, dtype=np.float64)
    start, stop = out_slice or (0, w.shape[0])
    rows = w[start:stop] + dw
    norms = np.sqrt(np.sum(rows * rows, axis=1))
    factors = np.array(case["magnitude"], np.float64) / norms
    merged = w.copy()
    merged[start:stop] = factors[:, None] * rows
    return {"dW": dw, "row_norms": norms, "factors": factors, "W_merged": merged}


def _checkpoint(
    path: Path, layout: str = "linear", out_slice: list[int] | None = None, **spec: Any
) -> Path:
    case = GOLDEN["adapter"]
    module: dict[str, Any] = {"d_in": 4, "d_out": 3, "layout": layout}
    if out_slice is not None:
        module["out_slice"] = out_slice
    name = case["module"]
    settings: dict[str, Any] = {
        "modules": {name: module},
        "r": case["r"],
        "k": case["k"],
        "base_model": fake_base_model(),
        "seed": case["seed"],
        "task_id": case["task_id"],
        "alpha": case["alpha"],
        "dora": True,
    } | spec
    tensors = {
        f"{name}.rslora_v_A": f32(case["v_A"]),
        f"{name}.rslora_v_B": f32(case["v_B"]),
    }
    if settings["dora"]:
        tensors[rslora_v1.magnitude_name(name)] = f32(case["magnitude"])
    return write_checkpoint(path, RsloraSpec(**settings), tensors)


class _Model(nn.Module):
    """A base holding the golden module at its real path (``model.layers.0.self_attn.q_proj``)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Module()])
        self.model.layers[0].self_attn = nn.Module()
        self.model.layers[0].self_attn.q_proj = layer

    def layer(self) -> nn.Module:
        return self.model.layers[0].self_attn.q_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer()(x)


def _linear(w: Any) -> _Model:
    w32 = torch.tensor(w, dtype=torch.float32)
    layer = nn.Linear(w32.shape[1], w32.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w32)
    return _Model(layer)


pytestmark = pytest.mark.golden


def test_golden_adapter_is_spec_tv3(golden: dict) -> None:
    """The pinned P~ numerators are the spec's TV3 (which test_rsg_golden checks against RSG-1)."""
    case = GOLDEN["adapter"]
    assert case["P_A_numerators"] == golden["TV3_P_A_numerators"]
    assert case["P_B_numerators"] == golden["TV3_P_B_numerators"]
    assert (case["seed"], case["task_id"], case["module"]) == (
        golden["TV3"]["seed"],
        golden["TV3"]["task_id"],
        golden["TV3"]["module"],
    )
    np.testing.assert_allclose(GOLDEN["linear"]["dW"], golden["TV3"]["dW"], rtol=tol.F64_RTOL)


def test_reference_reproduces_the_pinned_values() -> None:
    for case_name, out_slice in (("linear", None), ("out_slice", GOLDEN["out_slice"]["rows"])):
        case = GOLDEN[case_name]
        ref = reference_merge(GOLDEN["adapter"], np.array(case["W"]), out_slice)
        for key in ("dW", "row_norms", "factors", "W_merged"):
            np.testing.assert_allclose(
                ref[key], case[key], rtol=tol.F64_RTOL, atol=tol.F64_ATOL, err_msg=key
            )
    # the magnitude really rescales: no factor is 1, and they differ between rows
    factors = GOLDEN["linear"]["factors"]
    assert min(abs(f - 1) for f in factors) > 0.1
    assert max(factors) - min(factors) > 0.5


def test_seed_mode_dora_linear_merge_and_on_the_fly(tmp_path: Path) -> None:
    case = GOLDEN["linear"]
    ckpt = _checkpoint(tmp_path / "dora")
    adapter = load_adapter(ckpt)
    (delta,) = adapter.deltas
    np.testing.assert_array_equal(delta.magnitude, f32(GOLDEN["adapter"]["magnitude"]))
    np.testing.assert_allclose(delta.delta_weight(), case["dW"], rtol=tol.F64_IDENTITY)
    assert adapter.meta["dora"] is True
    assert adapter.meta["trainable_parameters"] == 2 * 2 + 3  # v_A, v_B, and the magnitude

    model = _linear(case["W"])
    fly = apply_on_the_fly(_linear(case["W"]), load_adapter(ckpt).deltas)
    (row,) = stats_as_dicts(merge_deltas(model, adapter.deltas))
    merged = model.layer().weight.detach().numpy()
    np.testing.assert_allclose(
        merged, case["W_merged"], rtol=tol.FP32_STORAGE_RTOL, atol=tol.FP32_STORAGE_ATOL
    )
    np.testing.assert_allclose(
        row["magnitude_factor"], [min(case["factors"]), max(case["factors"])], rtol=1e-6
    )
    np.testing.assert_allclose(np.linalg.norm(merged, axis=1), GOLDEN["adapter"]["magnitude"])
    x = torch.tensor(GOLDEN["x"], dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fly(x), model(x), rtol=0, atol=tol.FP32_ATOL)


def test_seed_mode_dora_conv1d_is_the_transpose(tmp_path: Path) -> None:
    case = GOLDEN["linear"]
    conv = Conv1D(3, 4)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(case["W"], dtype=torch.float32).T)
    model = _Model(conv)
    merge_deltas(model, load_adapter(_checkpoint(tmp_path / "conv", "conv1d")).deltas)
    np.testing.assert_allclose(
        conv.weight.detach().numpy().T,
        case["W_merged"],
        rtol=tol.FP32_STORAGE_RTOL,
        atol=tol.FP32_STORAGE_ATOL,
    )


def test_seed_mode_dora_out_slice_touches_only_its_rows(tmp_path: Path) -> None:
    case = GOLDEN["out_slice"]
    start, stop = case["rows"]
    model = _linear(case["W"])
    before = model.layer().weight.detach().clone()
    merge_deltas(
        model, load_adapter(_checkpoint(tmp_path / "slice", out_slice=case["rows"])).deltas
    )
    after = model.layer().weight.detach()
    keep = [i for i in range(after.shape[0]) if not start <= i < stop]
    assert torch.equal(after[keep], before[keep])
    np.testing.assert_allclose(
        after.numpy(), case["W_merged"], rtol=tol.FP32_STORAGE_RTOL, atol=tol.FP32_STORAGE_ATOL
    )


def test_stored_mode_and_float64_v_give_the_same_merge(tmp_path: Path) -> None:
    seed = _linear(GOLDEN["linear"]["W"])
    merge_deltas(seed, load_adapter(_checkpoint(tmp_path / "seed")).deltas)
    stored = _linear(GOLDEN["linear"]["W"])
    ckpt = _checkpoint(tmp_path / "stored", storage="stored", dtype_v="float64")
    tensors = rslora_v1.read_checkpoint(ckpt).tensors
    assert tensors[rslora_v1.magnitude_name(GOLDEN["adapter"]["module"])].dtype == np.float64
    merge_deltas(stored, load_adapter(ckpt).deltas)
    assert torch.equal(seed.layer().weight, stored.layer().weight)


def test_export_to_peft_dora_round_trips(tmp_path: Path) -> None:
    case = GOLDEN["linear"]
    to_peft_lora(_checkpoint(tmp_path / "dora"), tmp_path / "peft")
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["use_dora"] is True
    model = _linear(case["W"])
    merge_deltas(model, load_adapter(tmp_path / "peft").deltas)
    np.testing.assert_allclose(
        model.layer().weight.detach().numpy(),
        case["W_merged"],
        rtol=tol.FP32_STORAGE_RTOL,
        atol=tol.FP32_STORAGE_ATOL,
    )


def test_plain_checkpoint_has_no_dora_field(tmp_path: Path) -> None:
    """Without a magnitude the config bytes stay the spec's v1 (no ``dora`` key)."""
    ckpt = _checkpoint(tmp_path / "plain", dora=False)
    cfg = json.loads((ckpt / rslora_v1.CONFIG_NAME).read_text())
    assert "dora" not in cfg
    (delta,) = load_adapter(ckpt).deltas
    assert delta.magnitude is None


# --- bad magnitudes through the v1 reader --------------------------------------------------

MAG = rslora_v1.magnitude_name(GOLDEN["adapter"]["module"])


def rewrite_tensors(ckpt: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Edit the safetensors tensors, keeping the config binding (no E002)."""
    path = ckpt / rslora_v1.WEIGHTS_NAME
    tensors = load_file(str(path))
    edit(tensors)
    raw = (ckpt / rslora_v1.CONFIG_NAME).read_bytes()
    meta = {"format": rslora_v1.FORMAT, "format_version": "1"}
    save_file(
        tensors, str(path), metadata=meta | {"config_sha256": hashlib.sha256(raw).hexdigest()}
    )


def edit_config(ckpt: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit rslora_config.json and re-bind the safetensors metadata to the new bytes."""
    path = ckpt / rslora_v1.CONFIG_NAME
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    rewrite_tensors(ckpt, lambda tensors: None)


def expect(code: str, fn: Callable[[], Any], *needles: str) -> RsloraDeployError:
    with pytest.raises(RsloraDeployError) as info:
        fn()
    assert info.value.code == code, f"expected {code}, got {info.value.code}: {info.value}"
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {info.value}"
    return info.value


def _set(index: int, value: float) -> Any:
    def edit(tensors: dict[str, np.ndarray]) -> None:
        tensors[MAG] = tensors[MAG].copy()
        tensors[MAG][index] = value

    return edit


BAD: dict[str, tuple[Any, type[RsloraDeployError], str, str]] = {
    "wrong-shape": (
        lambda t: t.__setitem__(MAG, t[MAG][:-1].copy()),
        ShapeMismatchError,
        "E022",
        "expected [3]",
    ),
    "zero-entry": (_set(0, 0.0), ShapeMismatchError, "E022", "zero"),
    "nan": (_set(1, float("nan")), NonFiniteError, "E030", "NaN"),
    "inf": (_set(2, float("inf")), NonFiniteError, "E030", "NaN/Inf"),
    "float16": (
        lambda t: t.__setitem__(MAG, t[MAG].astype(np.float16)),
        RsloraDeployError,
        "E024",
        "F16",
    ),
    "missing": (lambda t: t.pop(MAG), RsloraDeployError, "E023", "missing tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_magnitude_is_refused_naming_the_tensor(case: str, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "bad")
    edit, cls, code, words = BAD[case]
    rewrite_tensors(ckpt, edit)
    err = expect(code, lambda: load_adapter(ckpt), words, MAG)
    assert isinstance(err, cls)


def test_magnitude_without_the_dora_flag_is_refused(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "noflag")
    edit_config(ckpt, lambda c: c.pop("dora"))
    expect("E023", lambda: load_adapter(ckpt), "unexpected tensor", MAG, '"dora": true')


def test_dora_flag_must_be_a_bool(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "flag")
    edit_config(ckpt, lambda c: c.update(dora="yes"))
    expect("E001", lambda: load_adapter(ckpt), "'dora'")


def test_bad_magnitude_exits_1_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from rslora_deploy.cli.app import main

    ckpt = _checkpoint(tmp_path / "cli")
    rewrite_tensors(ckpt, _set(0, 0.0))
    assert main(["adapter", "inspect", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert "E022" in err
    assert MAG in err


def test_writer_refuses_a_missing_or_stray_magnitude(tmp_path: Path) -> None:
    case = GOLDEN["adapter"]
    name = case["module"]
    spec = RsloraSpec(
        modules={name: {"d_in": 4, "d_out": 3, "layout": "linear"}},
        r=2,
        k=2,
        base_model=fake_base_model(),
        dora=True,
    )
    v = {f"{name}.rslora_v_A": f32(case["v_A"]), f"{name}.rslora_v_B": f32(case["v_B"])}
    with pytest.raises(ValueError, match="missing"):
        write_checkpoint(tmp_path / "a", spec, v)
    spec.dora = False
    with pytest.raises(ValueError, match="dora=False"):
        write_checkpoint(tmp_path / "b", spec, v | {MAG: f32(case["magnitude"])})
