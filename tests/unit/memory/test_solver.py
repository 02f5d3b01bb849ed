"""Solver arithmetic: the largest max_length / batch that fits, and the changes that would fit."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rslora_deploy.errors import ConfigError
from rslora_deploy.memory.estimate import Shape, predict_weight_bytes
from rslora_deploy.memory.solver import (
    Layout,
    largest_batch,
    largest_max_length,
    solve,
    total,
    validate_shape,
)
from rslora_deploy.model_view import ModelView
from rslora_deploy.profiles import load_profile

# Qwen2.5-0.5B's shape (config.json): 24 layers, hidden 896, 14 heads / 2 KV heads, vocab 151936.
QWEN = ModelView(
    "Qwen2ForCausalLM", "qwen2", hidden=896, layers=24, heads=14, kv_heads=2, head_dim=64,
    vocab=151936, intermediate=4864, tie_word_embeddings=True, quantization=None,
    context_length=32768,
)  # fmt: skip


def _layout(profile_name: str = "t4-2gb") -> Layout:
    profile = load_profile(profile_name)
    return Layout(sum(predict_weight_bytes(QWEN, 4, 64, profile).values()), 4, 64, False)


def test_largest_max_length_is_the_boundary() -> None:
    profile = load_profile("t4-2gb")
    layout, shape = _layout(), Shape(32768, 1)
    assert total(layout, QWEN, profile, shape) > profile.memory_bytes
    best = largest_max_length(layout, QWEN, profile, shape)
    assert best is not None
    assert total(layout, QWEN, profile, replace(shape, max_length=best)) <= profile.memory_bytes
    assert total(layout, QWEN, profile, replace(shape, max_length=best + 1)) > profile.memory_bytes


def test_largest_batch_is_the_boundary() -> None:
    profile = load_profile("cpu-2gb")
    layout, shape = _layout("cpu-2gb"), Shape(512, 1)
    best = largest_batch(layout, QWEN, profile, shape)
    assert best is not None
    assert best >= 1
    assert total(layout, QWEN, profile, replace(shape, batch=best)) <= profile.memory_bytes
    assert total(layout, QWEN, profile, replace(shape, batch=best + 1)) > profile.memory_bytes


def test_nothing_fits_when_the_weights_alone_exceed_the_budget() -> None:
    profile = load_profile("t4-2gb")
    answer = solve(Layout(3 * 2**30), QWEN, profile, Shape(2048, 1))
    assert answer["fits"] is False
    assert answer["largest_max_length"] is None
    assert answer["largest_batch"] is None


def test_changes_are_priced_by_the_estimate() -> None:
    profile = load_profile("t4-2gb")
    layout = _layout()
    shape = Shape(8192, 1, last_token_logits=False)
    answer = solve(layout, QWEN, profile, shape)
    by_name = {c["change"].split(" (")[0]: c for c in answer["changes"]}
    # last-token logits removes (max_length - 1) x vocab x io_bytes from the logits term,
    # and the slack charged on it.
    saved = (8192 - 1) * 151936 * 2
    expected = answer["total_bytes"] - saved - round(profile.model_slack * saved)
    assert abs(by_name["last-token logits"]["total_bytes"] - expected) <= 1
    # lm_head int4: the predicted weight delta (tied embeddings: one table).
    full = predict_weight_bytes(QWEN, 4, 64, profile)
    int4 = predict_weight_bytes(QWEN, 4, 64, profile, lm_head_int4=True)
    delta = sum(full.values()) - sum(int4.values())
    got = answer["total_bytes"] - by_name["lm_head int4"]["total_bytes"]
    assert abs(got - round(delta * (1 + profile.model_slack))) <= 1
    assert "group size 128" in by_name
    assert answer["changes"] == sorted(answer["changes"], key=lambda c: c["total_bytes"])
    assert all(c["fits"] is (c["total_bytes"] <= profile.memory_bytes) for c in answer["changes"])


@pytest.mark.parametrize(
    ("shape", "field"),
    [(Shape(0, 1), "max_length"), (Shape(-5, 1), "max_length"), (Shape(512, 0), "batch_size"),
     (Shape(65536, 1), "max_length 65536 is above the model's context")],
)  # fmt: skip
def test_bad_sizes_name_the_field(shape: Shape, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        validate_shape(QWEN, shape)


def test_int4_head_change_on_a_level4_cpu_graph_moves_both_prepack_terms() -> None:
    """cpu-2gb, fp32 head, projections at level 4: the int4 head drops ``lm_head_prepack`` (no
    float head left) and adds its table to the level-4 bytes ``nbits_prepack`` is charged on."""
    from rslora_deploy.memory.estimate import estimate_from_weights

    profile = load_profile("cpu-2gb")
    full = predict_weight_bytes(QWEN, 4, 64, profile)
    int4 = predict_weight_bytes(QWEN, 4, 64, profile, lm_head_int4=True)
    layout = Layout(sum(full.values()), 4, 64, False)
    shape = Shape(2048, 1, level4_nbits_bytes=full["projections"])
    answer = solve(layout, QWEN, profile, shape)
    got = next(c for c in answer["changes"] if c["change"].startswith("lm_head int4"))
    expected_shape = Shape(
        2048, 1, float_lm_head=False, level4_nbits_bytes=full["projections"] + int4["lm_head"]
    )
    expected = estimate_from_weights(sum(int4.values()), QWEN, profile, expected_shape)
    assert got["total_bytes"] == expected["estimate_bytes"]
    assert expected["terms_bytes"]["lm_head_prepack"] == 0
    assert expected["terms_bytes"]["nbits_prepack"] > 0


def test_ascend_packages_get_no_genai_weight_changes() -> None:
    """An ascend-om package ships fp16 weights: no int4 head, group or bit-width change applies."""
    profile = load_profile("ascend-310p-2gb")
    answer = solve(Layout(10**9), QWEN, profile, Shape(2048, 1))
    names = [c["change"] for c in answer["changes"]]
    assert not any(n.startswith(("lm_head", "group size", "4-bit", "8-bit")) for n in names)
