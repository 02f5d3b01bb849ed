"""Budget arithmetic: every term from its formula, checked by hand and by property."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from rslora_deploy.exporters.base import kv_cache_bytes
from rslora_deploy.model_view import ModelView
from rslora_deploy.profiles import load_profile
from rslora_deploy.stages.budget import estimate

SMOL = ModelView(
    "LlamaForCausalLM",
    "llama",
    hidden=576,
    layers=30,
    heads=9,
    kv_heads=3,
    head_dim=64,
    vocab=49152,
    intermediate=1536,
    tie_word_embeddings=True,
    quantization=None,
)


def test_kv_cache_matches_stack_notes_measurement() -> None:
    # stack-notes: peak RSS grew 69 MB from max_length 512 to 2048; the formula gives 70.8 MB
    # for the fp32 CPU cache (4 bytes per element).
    profile = load_profile("ascend-310p-2gb").model_copy(update={"kv_dtype": "float32"})
    delta = kv_cache_bytes(SMOL, profile, 2048) - kv_cache_bytes(SMOL, profile, 512)
    assert delta == 30 * 2 * 3 * 64 * (2048 - 512) * 4 == 70_778_880


def test_estimate_terms_by_hand(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\0" * 1000)  # unreadable graph: every position
    (tmp_path / "model.onnx.data").write_bytes(b"\0" * 24)
    (tmp_path / "genai_config.json").write_text('{"search": {"max_length": 2048}}')
    profile = load_profile("t4-2gb")
    report = estimate(tmp_path, SMOL, profile)
    terms = report["terms_bytes"]
    assert terms["weights"] == 1024  # json files are not weights
    assert terms["kv_cache"] == 1 * 30 * 2 * 3 * 64 * 2048 * 2
    assert terms["logits"] == 2048 * 49152 * 2
    assert terms["activations"] == 2048 * (4 * 576 + 3 * 1536) * 2 + 9 * 2048 * 2048 * 4
    model = terms["weights"] + terms["kv_cache"] + terms["logits"] + terms["activations"]
    assert terms["slack"] == round(profile.model_slack * model)
    assert terms["reserved"] == profile.reserved_bytes
    assert report["estimate_bytes"] == sum(terms.values())
    assert report["fits"] is (report["estimate_bytes"] <= 2 * 1024**3)
    assert report["reserved_source"]["kind"] == "allowance"


def test_estimate_follows_the_package_max_length(tmp_path: Path) -> None:
    (tmp_path / "model.onnx.data").write_bytes(b"\0" * 24)
    (tmp_path / "genai_config.json").write_text('{"search": {"max_length": 512}}')
    report = estimate(tmp_path, SMOL, load_profile("cpu-2gb"))
    assert report["inputs"]["max_seq_len"] == 512
    assert report["terms_bytes"]["kv_cache"] == 30 * 2 * 3 * 64 * 512 * 4  # fp32 KV on cpu


@settings(max_examples=50, deadline=None)
@given(
    layers=st.integers(1, 64),
    kv_heads=st.integers(1, 16),
    head_dim=st.sampled_from([32, 64, 128]),
    seq=st.integers(1, 8192),
    batch=st.integers(1, 8),
)
def test_kv_cache_monotone_and_linear(
    layers: int, kv_heads: int, head_dim: int, seq: int, batch: int
) -> None:
    view = ModelView("x", "x", 64, layers, kv_heads, kv_heads, head_dim, 100, 128, False, None)
    profile = load_profile("t4-2gb").model_copy(update={"batch_size": batch})
    one = kv_cache_bytes(view, profile, seq)
    assert one == batch * layers * 2 * kv_heads * head_dim * seq * 2
    assert kv_cache_bytes(view, profile, seq + 1) > one


def test_over_budget_is_reported(tmp_path: Path) -> None:
    (tmp_path / "model.onnx.data").write_bytes(b"")
    with (tmp_path / "model.onnx.data").open("r+b") as handle:
        handle.truncate(3 * 1024**3)  # sparse 3 GiB file: weights alone exceed 2 GiB
    report = estimate(tmp_path, SMOL, load_profile("t4-2gb"))
    assert report["fits"] is False
    assert report["headroom_bytes"] < 0


def test_predicted_weights_by_hand() -> None:
    from rslora_deploy.stages.budget import decoder_linear_params, predict_weight_bytes

    params = decoder_linear_params(SMOL)
    # q,o: 576x576; k,v: 576x192; gate, up, down: 576x1536 -> 3,538,944 per layer
    assert params == 30 * 3_538_944
    terms = predict_weight_bytes(SMOL, 4, 64, load_profile("t4-2gb"))
    assert terms["projections"] == params // 2 + params // 64 * 2 + params // 64 // 2
    assert terms["lm_head"] == 49152 * 576 * 2
