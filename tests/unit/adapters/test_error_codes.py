"""One negative test per error code of spec 5.5 (E001-E080), plus damaged files.

Each asserts the stable code and that the message names the module/tensor/field involved.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

from rslora_deploy.adapters import rslora_v1
from rslora_deploy.adapters.delta import ModuleDelta
from rslora_deploy.adapters.detect import load_adapter
from rslora_deploy.adapters.merge_math import merge_deltas
from rslora_deploy.adapters.rslora_writer import RsloraSpec, write_checkpoint
from rslora_deploy.errors import RsloraDeployError
from rslora_deploy.testing.adapters import f32, fake_base_model, write_peft_dir

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"


def make_ckpt(
    path: Path, *, modules: dict[str, Any] | None = None, v: dict | None = None, **overrides: Any
) -> Path:
    modules = modules or {
        Q: {"d_in": 64, "d_out": 64, "layout": "linear"},
        K: {"d_in": 64, "d_out": 32, "layout": "linear"},
    }
    spec = RsloraSpec(
        modules=modules,
        r=4,
        k=3,
        base_model=overrides.pop("base_model", fake_base_model()),
        seed=11,
        task_id="t",
        **overrides,
    )
    if v is None:
        rng = np.random.default_rng(0)
        v = {f"{m}.rslora_v_{f}": rng.uniform(-1, 1, 3) for m in modules for f in "AB"}
    return write_checkpoint(path, spec, v)


def edit_config(ckpt: Path, edit: Any, rebind: bool = True) -> None:
    """Change the config JSON; rebind=True re-writes the safetensors metadata hash (no E002)."""
    cfg_path = ckpt / rslora_v1.CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    edit(cfg)
    raw = (json.dumps(cfg, indent=2) + "\n").encode()
    cfg_path.write_bytes(raw)
    if rebind:
        rewrite_tensors(ckpt, lambda t: None)


def rewrite_tensors(ckpt: Path, edit: Any) -> None:
    import hashlib

    st = ckpt / rslora_v1.WEIGHTS_NAME
    tensors = load_file(str(st))
    edit(tensors)
    raw = (ckpt / rslora_v1.CONFIG_NAME).read_bytes()
    save_file(
        tensors,
        str(st),
        metadata={
            "format": rslora_v1.FORMAT,
            "format_version": "1",
            "config_sha256": hashlib.sha256(raw).hexdigest(),
        },
    )


def expect(code: str | None, fn: Any, *needles: str) -> RsloraDeployError:
    with pytest.raises(RsloraDeployError) as info:
        fn()
    err = info.value
    assert err.code == code, f"expected {code}, got {err.code}: {err}"
    text = str(err)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return err


# --- E001 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda c: c.update(format="lora"), "format"),
        (lambda c: c.update(format_version=2), "format_version"),
        (lambda c: c.pop("r"), "'r'"),
        (lambda c: c.update(v_sharing="per_layer"), "v_sharing"),
        (lambda c: c["projection"].update(storage="cloud"), "storage"),
        (lambda c: c["modules"][Q].update(layout="conv2d"), "layout"),
        (lambda c: c["dtype"].update(v="float16"), "dtype"),
    ],
)
def test_e001_config_fields(tmp_path: Path, edit: Any, needle: str) -> None:
    ckpt = make_ckpt(tmp_path / "a")
    edit_config(ckpt, edit)
    expect("E001", lambda: load_adapter(ckpt), needle)


def test_e001_config_not_json(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "a")
    (ckpt / rslora_v1.CONFIG_NAME).write_text("{not json")
    expect("E001", lambda: load_adapter(ckpt), "not valid JSON")


def test_e001_empty_directory(tmp_path: Path) -> None:
    expect("E001", lambda: load_adapter(tmp_path), "empty")


def test_e001_grouped_module_in_no_group(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "a")
    edit_config(ckpt, lambda c: c.update(v_sharing="grouped", v_groups={"g": [Q]}))
    expect("E001", lambda: load_adapter(ckpt), K)


# --- E002/E003 ----------------------------------------------------------------------------


def test_e002_config_not_bound(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "a")
    edit_config(ckpt, lambda c: c.update(task_id="t"), rebind=False)  # same JSON, new bytes
    (ckpt / rslora_v1.CONFIG_NAME).write_bytes((ckpt / rslora_v1.CONFIG_NAME).read_bytes() + b" ")
    expect("E002", lambda: load_adapter(ckpt), "config_sha256")


def test_e003_effective_scale(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "a")
    edit_config(ckpt, lambda c: c.update(effective_scale=c["effective_scale"] * (1 + 1e-9)))
    expect("E003", lambda: load_adapter(ckpt), "effective_scale", "r=4", "k=3")


# --- E010 (needs a real base directory) ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rslora_deploy.testing.tiny import save_tiny, tiny_llama

    return save_tiny(tiny_llama(), tmp_path_factory.mktemp("base") / "llama")


def _real_ckpt(path: Path, base: Path) -> Path:
    from rslora_deploy.adapters.base_hash import config_sha256, target_weights_sha256

    mods = [Q, K]
    bm = {
        "name_or_path": "tiny",
        "architecture": "LlamaForCausalLM",
        "config_sha256": config_sha256(base),
        "target_weights_sha256": target_weights_sha256(base, mods)[0],
    }
    return make_ckpt(path, base_model=bm)


def test_e010_changed_base_weight_and_nothing_written(tmp_path: Path, tiny_base: Path) -> None:
    from rslora_deploy.config import AdapterConfig, MergeConfig
    from rslora_deploy.stages.merge import merge_adapter

    ckpt = _real_ckpt(tmp_path / "a", tiny_base)
    changed = tmp_path / "base2"
    changed.mkdir()
    for f in tiny_base.iterdir():
        (changed / f.name).write_bytes(f.read_bytes())
    state = load_file(str(changed / "model.safetensors"))
    state[f"{K}.weight"][0, 0] += 1.0
    save_file(state, str(changed / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    expect(
        "E010",
        lambda: merge_adapter(changed, ckpt, out, MergeConfig(), AdapterConfig()),
        "target_weights_sha256",
        "allow_base_mismatch",
    )
    assert not out.exists()
    art = merge_adapter(changed, ckpt, out, MergeConfig(), AdapterConfig(allow_base_mismatch=True))
    assert (art.path / "model.safetensors").is_file()
    report = json.loads((out / "merge_report.json").read_text())
    assert report["base_check"]["weights_match"] is False
    # and the unchanged base passes
    ok = merge_adapter(tiny_base, ckpt, tmp_path / "out2", MergeConfig(), AdapterConfig())
    assert json.loads((ok.path / "merge_report.json").read_text())["base_check"]["weights_match"]


# --- E020-E024 ----------------------------------------------------------------------------


def _tiny() -> nn.Module:
    from rslora_deploy.testing.tiny import tiny_llama

    return tiny_llama()


def test_e020_missing_module() -> None:
    delta = ModuleDelta(
        "model.layers.7.self_attn.q_proj", "linear", 64, 64, dense=np.zeros((64, 64))
    )
    expect("E020", lambda: merge_deltas(_tiny(), [delta]), "model.layers.7.self_attn.q_proj")


def test_e021_unsupported_module_type() -> None:
    delta = ModuleDelta("model.norm", "linear", 64, 64, dense=np.zeros((64, 64)))
    expect("E021", lambda: merge_deltas(_tiny(), [delta]), "model.norm", "RMSNorm")


def test_e022_d_in_mismatch(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "a", modules={Q: {"d_in": 48, "d_out": 64, "layout": "linear"}})
    deltas = load_adapter(ckpt).deltas
    expect("E022", lambda: merge_deltas(_tiny(), deltas), Q, "d_in=48", "d_in=64")


def test_e022_v_shape_and_out_slice(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "a")
    rewrite_tensors(ckpt, lambda t: t.update({f"{Q}.rslora_v_A": f32([1, 2, 3, 4])}))
    expect("E022", lambda: load_adapter(ckpt), f"{Q}.rslora_v_A", "[4]", "[3]")
    sliced = make_ckpt(
        tmp_path / "b",
        modules={K: {"d_in": 64, "d_out": 16, "layout": "linear", "out_slice": [24, 40]}},
    )
    deltas = load_adapter(sliced).deltas
    expect("E022", lambda: merge_deltas(_tiny(), deltas), K, "out_slice")


def test_e023_missing_and_unexpected_tensor(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "a")
    rewrite_tensors(ckpt, lambda t: t.update(extra=f32([1.0])))
    expect("E023", lambda: load_adapter(ckpt), "unexpected tensor 'extra'")
    ckpt2 = make_ckpt(tmp_path / "b")
    rewrite_tensors(ckpt2, lambda t: t.pop(f"{K}.rslora_v_B"))
    expect("E023", lambda: load_adapter(ckpt2), f"{K}.rslora_v_B")


def test_e024_half_precision_v(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "a")
    rewrite_tensors(
        ckpt, lambda t: t.update({f"{Q}.rslora_v_B": t[f"{Q}.rslora_v_B"].astype(np.float16)})
    )
    expect("E024", lambda: load_adapter(ckpt), f"{Q}.rslora_v_B", "F16", "F32")


# --- E030 ---------------------------------------------------------------------------------


def test_e030_nan_in_v(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "a")
    rewrite_tensors(ckpt, lambda t: t[f"{K}.rslora_v_A"].__setitem__(1, np.nan))
    expect("E030", lambda: load_adapter(ckpt), f"{K}.rslora_v_A", "NaN")


def test_e030_nan_in_peft_factor(tmp_path: Path) -> None:
    path = write_peft_dir(
        tmp_path,
        {"peft_type": "LORA", "r": 1, "lora_alpha": 1},
        {
            "base_model.model.lin.lora_A.weight": [[1.0, np.inf]],
            "base_model.model.lin.lora_B.weight": [[1.0]],
        },
    )
    expect("E030", lambda: load_adapter(path), "lin", "lora_A")


# --- E040/E041 ----------------------------------------------------------------------------


def test_e040_tampered_stored_basis(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "a", storage="stored")
    assert load_adapter(ckpt).deltas  # untampered loads

    def tamper(t: dict) -> None:
        t[f"{K}.rslora_P_B"][0, 0, 0] += 2.0**-24

    rewrite_tensors(ckpt, tamper)
    expect("E040", lambda: load_adapter(ckpt), K, "factor B", "expected")


def test_e040_seed_changed_and_aggregate_edited(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "a")
    edit_config(ckpt, lambda c: c["projection"].update(seed=12))
    expect("E040", lambda: load_adapter(ckpt), "projection checksum mismatch")
    ckpt2 = make_ckpt(tmp_path / "b")
    edit_config(ckpt2, lambda c: c["projection"].update(sha256_all="0" * 64))
    expect("E040", lambda: load_adapter(ckpt2), "sha256_all")


def test_e041_unknown_generator_and_external_seed(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "a")
    edit_config(ckpt, lambda c: c["projection"].update(generator={"name": "torch"}))
    expect("E041", lambda: load_adapter(ckpt), "generator")
    ckpt2 = make_ckpt(tmp_path / "b")
    edit_config(ckpt2, lambda c: c["projection"].update(generator={"name": "external"}))
    expect("E041", lambda: load_adapter(ckpt2), "external")


# --- E050/E051/E060 -----------------------------------------------------------------------


def test_e050_tied_lm_head_then_untie() -> None:
    from rslora_deploy.testing.tiny import tiny_llama

    model = tiny_llama(tie=True)
    rng = np.random.default_rng(0)
    delta = ModuleDelta(
        "lm_head",
        "linear",
        64,
        128,
        B=rng.normal(size=(128, 2)),
        A=rng.normal(size=(2, 64)),
        scale=0.1,
    )
    expect("E050", lambda: merge_deltas(model, [delta]), "lm_head", "--untie")
    embed_before = model.model.embed_tokens.weight.detach().clone()
    merge_deltas(model, [delta], untie=True)
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.model.embed_tokens.weight, embed_before)
    assert not torch.equal(model.lm_head.weight, embed_before)


def test_e051_split_adapter_on_fused_weight() -> None:
    from rslora_deploy.testing.tiny import tiny_gpt2

    delta = ModuleDelta("transformer.h.0.attn.c_attn", "conv1d", 64, 64, dense=np.ones((64, 64)))
    expect("E051", lambda: merge_deltas(tiny_gpt2(), [delta]), "c_attn", "out_slice")


class QuantLinear(nn.Module):
    """Stand-in for a GPTQ packed layer: int32 qweight, no float weight."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("qweight", torch.zeros(8, 64, dtype=torch.int32))


def test_e060_quantized_base_layer() -> None:
    model = _tiny()
    model.model.layers[0].self_attn.q_proj = QuantLinear()
    delta = ModuleDelta(Q, "linear", 64, 64, dense=np.zeros((64, 64)))
    expect("E060", lambda: merge_deltas(model, [delta]), Q, "quantized")


def test_e061_malformed_bnb4_base(tmp_path: Path) -> None:
    """A bitsandbytes 4-bit base whose quant state lacks a field (full cases: test_bnb4.py)."""
    from safetensors.numpy import load_file as load_np
    from safetensors.numpy import save_file as save_np

    from rslora_deploy.adapters.st_io import SafetensorsFile
    from rslora_deploy.quantizers import bnb4
    from rslora_deploy.testing.bnb4 import write_bnb4_dir

    src = write_bnb4_dir(tmp_path)
    weights = src / "model.safetensors"
    tensors = load_np(str(weights))
    key = f"{Q}.weight.{bnb4.STATE_PREFIX}nf4"
    state = json.loads(bytes(tensors[key]).decode())
    del state["blocksize"]
    tensors[key] = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8).copy()
    save_np(tensors, str(weights))
    out = tmp_path / "out"
    out.mkdir()
    run = lambda: bnb4.dequantize_checkpoint(src, out, [SafetensorsFile(weights)])  # noqa: E731
    expect("E061", run, key, "'blocksize'")


# --- E070/E071/E080 -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "tensors", "needle"),
    [
        ({"modules_to_save": ["lm_head"]}, {}, "modules_to_save"),
        ({"lora_bias": True}, {}, "lora_bias"),
    ],
)
def test_e070_unsupported_peft_features(
    tmp_path: Path, cfg: dict, tensors: dict, needle: str
) -> None:
    base = {
        "base_model.model.lin.lora_A.weight": [[1.0, 2.0]],
        "base_model.model.lin.lora_B.weight": [[1.0]],
    }
    path = write_peft_dir(
        tmp_path, {"peft_type": "LORA", "r": 1, "lora_alpha": 1, **cfg}, {**base, **tensors}
    )
    expect("E070", lambda: load_adapter(path), needle)


def test_dora_tensors_disagreeing_with_the_config_are_e023(tmp_path: Path) -> None:
    """A magnitude without use_dora (or use_dora without one) would merge the wrong formula."""
    factors = {
        "base_model.model.lin.lora_A.weight": [[1.0, 2.0]],
        "base_model.model.lin.lora_B.weight": [[1.0]],
    }
    stray = {**factors, "base_model.model.lin.lora_magnitude_vector": [1.0]}
    path = write_peft_dir(tmp_path / "stray", {"peft_type": "LORA", "r": 1}, stray)
    expect("E023", lambda: load_adapter(path), "use_dora=false")
    lacking = {"peft_type": "LORA", "r": 1, "use_dora": True}
    path = write_peft_dir(tmp_path / "lacking", lacking, factors)
    expect("E023", lambda: load_adapter(path), "no lora_magnitude_vector")


def test_e070_dora_on_vera(tmp_path: Path) -> None:
    path = write_peft_dir(
        tmp_path,
        {"peft_type": "VERA", "r": 2, "use_dora": True, "save_projection": True},
        {"base_model.model.lin.vera_lambda_b": [1.0], "base_model.model.lin.vera_lambda_d": [1.0]},
    )
    expect("E070", lambda: load_adapter(path), "use_dora")


def test_e071_vera_without_projections(tmp_path: Path) -> None:
    path = write_peft_dir(
        tmp_path,
        {"peft_type": "VERA", "r": 2},
        {
            "base_model.model.lin.vera_lambda_b": [1.0, 2.0],
            "base_model.model.lin.vera_lambda_d": [1.0, 1.0],
        },
    )
    expect("E071", lambda: load_adapter(path), "save_projection=False")


def test_e080_fp16_overflow() -> None:
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[65000.0, 1.0]]))
    holder = nn.ModuleDict({"lin": lin})
    delta = ModuleDelta("lin", "linear", 2, 1, dense=np.array([[1000.0, 0.0]]))
    expect("E080", lambda: merge_deltas(holder, [delta], dtype=torch.float16), "lin", "float16")
    assert float(lin.weight[0, 0]) == 65000.0  # nothing was written


# --- damaged files ------------------------------------------------------------------------


def test_truncated_safetensors(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "a")
    st = ckpt / rslora_v1.WEIGHTS_NAME
    st.write_bytes(st.read_bytes()[:-5])
    expect(None, lambda: load_adapter(ckpt), "truncated", rslora_v1.WEIGHTS_NAME)


def test_corrupted_safetensors_header(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "a")
    st = ckpt / rslora_v1.WEIGHTS_NAME
    data = bytearray(st.read_bytes())
    data[8:12] = b"XXXX"
    st.write_bytes(bytes(data))
    expect(None, lambda: load_adapter(ckpt), "not JSON")


class _Boom:
    def __reduce__(self) -> Any:
        return (Path.touch, (Path("/tmp/rslora-deploy-pickle-was-executed"),))


def test_pickle_in_place_of_safetensors_is_not_unpickled(tmp_path: Path) -> None:
    marker = Path("/tmp/rslora-deploy-pickle-was-executed")
    marker.unlink(missing_ok=True)
    ckpt = make_ckpt(tmp_path / "a")
    (ckpt / rslora_v1.WEIGHTS_NAME).write_bytes(pickle.dumps({"x": _Boom()}))
    expect(None, lambda: load_adapter(ckpt), "pickle", "not unpickled")
    peft_dir = write_peft_dir(
        tmp_path / "p",
        {"peft_type": "LORA", "r": 1, "lora_alpha": 1},
        {
            "base_model.model.lin.lora_A.weight": [[1.0]],
            "base_model.model.lin.lora_B.weight": [[1.0]],
        },
    )
    (peft_dir / "adapter_model.safetensors").write_bytes(pickle.dumps(_Boom()))
    expect(None, lambda: load_adapter(peft_dir), "pickle")
    assert not marker.exists()


def test_legacy_bin_only_via_weights_only(tmp_path: Path) -> None:
    marker = Path("/tmp/rslora-deploy-pickle-was-executed")
    marker.unlink(missing_ok=True)
    good = tmp_path / "good"
    good.mkdir()
    (good / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2})
    )
    torch.save(
        {
            "base_model.model.lin.lora_A.weight": torch.ones(1, 2),
            "base_model.model.lin.lora_B.weight": torch.ones(3, 1),
        },
        good / "adapter_model.bin",
    )
    (delta,) = load_adapter(good).deltas
    np.testing.assert_array_equal(delta.delta_weight(), 2 * np.ones((3, 2)))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    torch.save({"x": _Boom()}, bad / "adapter_model.bin")
    expect(None, lambda: load_adapter(bad), "weights_only=True")
    assert not marker.exists()


def test_peft_config_not_json(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("peft_type: LORA")
    expect("E001", lambda: load_adapter(tmp_path), "adapter_config.json", "JSON")
