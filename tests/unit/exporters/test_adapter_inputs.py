"""Run-time LoRA inputs: one fused node's factors carry each module's exact delta on its rows."""

from __future__ import annotations

import numpy as np
import pytest

from rslora_deploy.adapters.delta import ModuleDelta
from rslora_deploy.exporters.genai.adapter_inputs import (
    AdapterInputError,
    Slot,
    adapter_parameters,
    slots_from_json,
    slots_to_json,
)

QKV = Slot(
    "model.layers.0.attn.qkv_proj",
    k=8,
    n=16,
    modules=(
        ("model.layers.0.self_attn.q_proj", 0, 8),
        ("model.layers.0.self_attn.k_proj", 8, 4),
        ("model.layers.0.self_attn.v_proj", 12, 4),
    ),
)


def _delta(name: str, d_out: int, rank: int, seed: int, **kw) -> ModuleDelta:
    rng = np.random.default_rng(seed)
    return ModuleDelta(
        name, "linear", 8, d_out, B=rng.normal(size=(d_out, rank)),
        A=rng.normal(size=(rank, 8)), scale=0.5, **kw,
    )  # fmt: skip


def test_fused_qkv_factors_reproduce_each_modules_delta_on_its_rows() -> None:
    q = _delta("model.layers.0.self_attn.q_proj", 8, 2, 0)
    v = _delta("model.layers.0.self_attn.v_proj", 4, 3, 1)
    params = adapter_parameters("t", [q, v], {QKV.node: QKV}, np.float64)
    a, b = params[QKV.input_a], params[QKV.input_b]
    assert a.shape == (8, 5)
    assert b.shape == (5, 16)
    fused = (a @ b).T  # the node's (N, K) update
    np.testing.assert_allclose(fused[0:8], q.delta_weight(), rtol=1e-12)
    np.testing.assert_array_equal(fused[8:12], 0.0)  # k is not adapted
    np.testing.assert_allclose(fused[12:16], v.delta_weight(), rtol=1e-12)


@pytest.mark.parametrize(
    ("delta", "message"),
    [
        (_delta("model.embed_tokens", 8, 2, 0), "no run-time branch"),
        (
            _delta("model.layers.0.self_attn.q_proj", 8, 2, 0, magnitude=np.ones(8)),
            "is DoRA",
        ),
        (_delta("model.layers.0.self_attn.k_proj", 8, 2, 0), "d_out=8"),
    ],
)
def test_what_a_run_time_branch_cannot_carry_is_refused_naming_the_module(
    delta: ModuleDelta, message: str
) -> None:
    with pytest.raises(AdapterInputError, match=message) as info:
        adapter_parameters("task", [delta], {QKV.node: QKV}, np.float32)
    assert "'task'" in str(info.value)
    assert delta.name in str(info.value)


def test_slots_survive_their_json_form() -> None:
    assert slots_from_json(slots_to_json({QKV.node: QKV})) == {QKV.node: QKV}
