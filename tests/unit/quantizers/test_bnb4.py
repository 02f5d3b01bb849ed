"""Our bitsandbytes 4-bit dequantizer: bit-exact against bitsandbytes, and strict on bad input.

The comparisons with bitsandbytes skip (saying why) where it is not installed; the format tests
(a hand-packed golden weight, hand-built checkpoints) and every bad-input test always run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from rslora_deploy.adapters.st_io import SafetensorsFile
from rslora_deploy.errors import Bnb4CheckpointError, UnsupportedError
from rslora_deploy.quantizers import bnb4
from rslora_deploy.testing.bnb4 import write_bnb4_dir as write_bnb_dir
from rslora_deploy.testing.tiny import save_tiny, tiny_llama

BNB_REASON = "bitsandbytes is not installed: the bit-exact comparison needs its dequantize_4bit"
Q = "model.layers.0.self_attn.q_proj.weight"


def dequantize_dir(src: Path, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    files = [SafetensorsFile(p) for p in sorted(src.glob("*.safetensors"))]
    return bnb4.dequantize_checkpoint(src, out, files)


def edit_tensors(directory: Path, edit: Any) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def state_bytes(state: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(json.dumps(state).encode(), dtype=np.uint8).copy()


def expect_e061(fn: Any, *needles: str) -> str:
    with pytest.raises(Bnb4CheckpointError) as info:
        fn()
    text = str(info.value)
    assert info.value.code == "E061", text
    assert "\n" not in text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text


# --- the format, without bitsandbytes -------------------------------------------------------


def test_golden_high_nibble_first_and_flat_partial_blocks() -> None:
    # 6 elements, blocksize 32... too small for bnb's set, so use 32 with 40 elements: two
    # blocks, the second partial (8 elements). Byte 0x7F: element 0 is code 7 (nf4 0.0),
    # element 1 code 15 (1.0).
    state = bnb4.QuantState("nf4", 32, (5, 8), "float32")
    packed = np.full(20, 0x7F, np.uint8)
    packed[16] = 0xF0  # elements 32 (code 15) and 33 (code 0: -1.0), both in block 1
    absmax = np.array([2.0, 3.0], np.float32)
    w = bnb4.dequantize_weight(
        "w", state, {"": packed, "absmax": absmax, "quant_map": bnb4.NF4_MAP.copy()}
    )
    flat = w.reshape(-1)
    assert w.shape == (5, 8)
    assert w.dtype == np.float32
    assert flat[0] == 0.0
    assert flat[1] == 2.0
    assert flat[31] == 2.0
    assert flat[32] == 3.0
    assert flat[33] == -3.0
    assert flat[35] == 3.0


def bits(x: np.ndarray) -> np.ndarray:
    """The float32 bit patterns, with -0.0 read as +0.0 (bnb's kernels disagree on its sign)."""
    return (np.asarray(x, np.float32) + np.float32(0.0)).view(np.uint32)


def test_fp4_codes_0_and_8_are_zero() -> None:
    state = bnb4.QuantState("fp4", 32, (32,), "float32")
    packed = np.full(16, 0x83, np.uint8)  # codes 8, 3, 8, 3, ...: 0 and 1.0
    w = bnb4.dequantize_weight(
        "w", state, {"": packed, "absmax": np.full(1, 2.0, np.float32), "quant_map": bnb4.FP4_MAP}
    )
    assert w[0] == 0.0
    assert w[1] == 2.0
    assert not np.signbit(w[0])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_hand_built_checkpoint_round_trips(tmp_path: Path, quant_type: str, nested: bool) -> None:
    src = write_bnb_dir(tmp_path, quant_type, nested)
    summary = dequantize_dir(src, tmp_path / "out")
    assert summary["quant_type"] == quant_type
    assert summary["double_quant"] is nested
    assert summary["weights"] == 14
    assert summary["blocksize"] == [64]
    fp = load_file(str(tmp_path / "fp" / "model.safetensors"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(fp)
    for key, value in fp.items():
        assert out[key].dtype == np.float32, key
        assert out[key].shape == value.shape, key
        bound = 0.35 if quant_type == "fp4" else 0.2  # half the widest code gap x absmax
        assert np.abs(out[key] - value).max() <= bound * np.abs(value).max() + 1e-6, key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"


def test_8bit_checkpoint_is_unsupported() -> None:
    cfg = {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}
    with pytest.raises(UnsupportedError, match="8-bit"):
        bnb4.bnb4_config(cfg)
    assert bnb4.bnb4_config({"quantization_config": {"quant_method": "gptq"}}) is None
    assert bnb4.bnb4_config({}) is None


# --- bad input: always runs ---------------------------------------------------------------


def _pop_state_field(field: str) -> Any:
    def edit(t: dict[str, np.ndarray]) -> None:
        key = f"{Q}.{bnb4.STATE_PREFIX}nf4"
        state = json.loads(bytes(t[key]).decode())
        state.pop(field)
        t[key] = state_bytes(state)

    return edit


def _set_state(**changes: Any) -> Any:
    def edit(t: dict[str, np.ndarray]) -> None:
        key = f"{Q}.{bnb4.STATE_PREFIX}nf4"
        t[key] = state_bytes({**json.loads(bytes(t[key]).decode()), **changes})

    return edit


def _rename_state(t: dict[str, np.ndarray]) -> None:
    t[f"{Q}.{bnb4.STATE_PREFIX}int3"] = t.pop(f"{Q}.{bnb4.STATE_PREFIX}nf4")


BAD = {
    "missing field blocksize": (_pop_state_field("blocksize"), ["'blocksize'", "missing"]),
    "missing field shape": (_pop_state_field("shape"), ["'shape'", "expected list"]),
    "unknown quant type in name": (_rename_state, ["int3", "nf4, fp4"]),
    "quant type disagrees": (_set_state(quant_type="fp4"), ["'fp4'", "expected 'nf4'"]),
    "blocksize not bnb's": (_set_state(blocksize=48), ["blocksize 48", "32, 64"]),
    "blocksize vs absmax": (
        _set_state(blocksize=128),
        [".absmax", "64 blocks", "expected 32", "blocksize 128"],
    ),
    "shape vs codes": (_set_state(shape=[64, 65]), [Q, "2048 bytes", "expected 2080"]),
    "state not json": (
        lambda t: t.update({f"{Q}.{bnb4.STATE_PREFIX}nf4": np.frombuffer(b"{no", np.uint8)}),
        ["not the UTF-8 JSON object"],
    ),
    "missing absmax": (lambda t: t.pop(f"{Q}.absmax"), [f"{Q}.absmax", "lacks tensor"]),
    "missing state": (
        lambda t: t.pop(f"{Q}.{bnb4.STATE_PREFIX}nf4"),
        [f"{Q}.absmax", "no", "quant state"],
    ),
    "non-standard quant map": (
        lambda t: t[f"{Q}.quant_map"].__setitem__(3, 0.5),
        [f"{Q}.quant_map", "standard nf4"],
    ),
    "nested declared, no tensors": (
        _set_state(nested_blocksize=256, nested_dtype="float32", nested_offset=0.1),
        [f"{Q}.nested_absmax", "lacks"],
    ),
    "nested offset not a number": (
        _set_state(nested_blocksize=256, nested_offset="x"),
        ["'nested_offset'", "expected int or float"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_raises_e061(tmp_path: Path, case: str) -> None:
    src = write_bnb_dir(tmp_path)
    edit, needles = BAD[case]
    edit_tensors(src, edit)
    expect_e061(lambda: dequantize_dir(src, tmp_path / "out"), *needles)


def test_config_without_quantized_weights(tmp_path: Path) -> None:
    src = write_bnb_dir(tmp_path)
    edit_tensors(
        src, lambda t: [t.pop(k) for k in list(t) if k.startswith(Q) and k != Q]
    )  # the weight alone stays, a U8 tensor with no quant state
    edit_tensors(
        src, lambda t: [t.pop(k) for k in list(t) if bnb4.STATE_PREFIX in k or "absmax" in k]
    )
    edit_tensors(src, lambda t: [t.pop(k) for k in list(t) if k.endswith("quant_map")])
    expect_e061(lambda: dequantize_dir(src, tmp_path / "out"), "no tensor has a", "quant state")


# --- bit-exact against bitsandbytes ----------------------------------------------------------


def _bnb_reference(packed: Any, state_dict: dict[str, Any]) -> np.ndarray:
    """bitsandbytes' own dequantize_4bit of a stored weight, from its stored quant state."""
    import bitsandbytes.functional as bnbf

    state = bnbf.QuantState.from_dict(state_dict, device=torch.device("cpu"))
    return bnbf.dequantize_4bit(packed, state).numpy()


def _ours(name: str, tensors: dict[str, torch.Tensor]) -> np.ndarray:
    key = next(k for k in tensors if bnb4.STATE_PREFIX in k)
    state = bnb4.parse_quant_state(name, tensors[key].numpy().tobytes(), key.rpartition("__")[2])
    arrays = {k.removeprefix(name).lstrip("."): v.numpy() for k, v in tensors.items()}
    return bnb4.dequantize_weight(name, state, arrays)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
def test_equals_bitsandbytes_functional(quant_type: str, nested: bool, blocksize: int) -> None:
    """Weights quantized by bnb's quantize_4bit, stored as as_dict(packed=True) writes them."""
    pytest.importorskip("bitsandbytes", reason=BNB_REASON)
    import bitsandbytes.functional as bnbf

    gen = torch.Generator().manual_seed(blocksize)
    for shape in [(64, 256), (96, 512), (300, 1024)]:
        w = torch.randn(shape, generator=gen) * 0.05
        packed, state = bnbf.quantize_4bit(
            w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested
        )
        stored = {"w": packed} | {f"w.{k}": v for k, v in state.as_dict(packed=True).items()}
        ref = _bnb_reference(packed, state.as_dict(packed=True))
        mine = _ours("w", stored)
        assert mine.dtype == ref.dtype == np.float32
        assert np.array_equal(bits(mine), bits(ref)), (shape, blocksize)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_partial_last_block_equals_bitsandbytes_flat(quant_type: str) -> None:
    """Rows that are not a multiple of the block size: bnb 0.50.2's 2-D CPU kernel blocks per
    row (wrong); its flat (1-D) call reads the format as its quantizer wrote it. We equal that."""
    pytest.importorskip("bitsandbytes", reason=BNB_REASON)
    import bitsandbytes.functional as bnbf

    w = torch.randn(33, 40, generator=torch.Generator().manual_seed(1)) * 0.05
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    stored = {"w": packed} | {f"w.{k}": v for k, v in state.as_dict(packed=True).items()}
    mine = _ours("w", stored)
    state.shape = torch.Size([w.numel()])
    flat = bnbf.dequantize_4bit(packed, state).numpy().reshape(-1)
    assert np.array_equal(bits(mine.reshape(-1)), bits(flat))
    err_ours = float(np.abs(mine - w.numpy()).max())
    assert err_ours <= 0.2 * float(w.abs().max())


@pytest.fixture(scope="module")
def saved_4bit(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    """A tiny Llama loaded with BitsAndBytesConfig on CPU and saved by transformers, 4 ways."""
    pytest.importorskip("bitsandbytes", reason=BNB_REASON)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("bnb4")
    src = save_tiny(tiny_llama(hidden=64), root / "fp")
    dirs = {}
    for quant_type in ("nf4", "fp4"):
        for nested in (False, True):
            cfg = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=quant_type,
                bnb_4bit_use_double_quant=nested,
                bnb_4bit_compute_dtype=torch.float32,
            )
            model = AutoModelForCausalLM.from_pretrained(
                src, quantization_config=cfg, device_map="cpu"
            )
            dirs[quant_type, nested] = root / f"{quant_type}-{int(nested)}"
            model.save_pretrained(dirs[quant_type, nested])
    return dirs


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_transformers_checkpoint_equals_bitsandbytes(
    saved_4bit: dict[tuple[str, bool], Path], tmp_path: Path, quant_type: str, nested: bool
) -> None:
    """Every weight of a checkpoint transformers saved, reloaded by transformers + bnb and
    dequantized by bnb, equals ours to the bit; the unquantized tensors are copied."""
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    src = saved_4bit[quant_type, nested]
    summary = dequantize_dir(src, tmp_path / "out")
    assert (summary["quant_type"], summary["double_quant"]) == (quant_type, nested)
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(src, device_map="cpu")
    compared = 0
    for name, param in model.named_parameters():
        if getattr(param, "quant_state", None) is not None:
            ref = bnbf.dequantize_4bit(param.data, param.quant_state).numpy()
            compared += 1
        else:
            ref = param.detach().numpy()
        assert np.array_equal(bits(ours[name]), bits(ref)), name
    assert compared == summary["weights"] == 14


def test_sharded_checkpoint_with_companions_in_another_shard(tmp_path: Path) -> None:
    """Shards are dequantized one by one, names kept; a weight's absmax may sit elsewhere."""
    src = write_bnb_dir(tmp_path)
    single = dequantize_dir(src, tmp_path / "single")
    whole = load_file(str(tmp_path / "single" / "model.safetensors"))
    tensors = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    first = {k: v for k, v in tensors.items() if ".layers.0." in k and not k.endswith("absmax")}
    second = {k: v for k, v in tensors.items() if k not in first}
    save_file(first, str(src / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(second, str(src / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    sharded = dequantize_dir(src, tmp_path / "sharded")
    assert sharded == single
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(whole)
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        for key, value in load_file(str(tmp_path / "sharded" / shard)).items():
            assert index["weight_map"][key] == shard
            assert np.array_equal(value, whole[key]), key
