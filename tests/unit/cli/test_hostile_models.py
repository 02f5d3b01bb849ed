"""Hostile base models: safetensors directories and GGUF files broken in every way we know.

Each case copies a valid tiny Llama (or the head of the real SmolLM2 GGUF), breaks one thing and
runs ``rslora-deploy build --base``; the ``load`` stage must refuse it before any weight is loaded
(so the whole file runs in seconds, dominated by the first torch import).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.unit.cli.clean_failure import assert_clean_failure

Raw = dict[str, tuple[str, list[int], bytes]]
WEIGHTS = "model.safetensors"
NORM = "model.norm.weight"
Q = "model.layers.0.self_attn.q_proj.weight"


def read_raw(path: Path) -> tuple[dict, Raw]:
    """(metadata, name -> (dtype, shape, bytes)) of a valid safetensors file."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    meta = header.pop("__metadata__", {})
    data = blob[8 + length :]
    raw = {k: (v["dtype"], v["shape"], data[slice(*v["data_offsets"])]) for k, v in header.items()}
    return meta, raw


def write_raw(path: Path, raw: Raw, meta: object = None, patch: Callable | None = None) -> None:
    """Write tensors with honest offsets; ``patch(header)`` may then lie about them."""
    header: dict = {"__metadata__": meta} if meta is not None else {}
    offset, chunks = 0, []
    for name, (dtype, shape, data) in raw.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        chunks.append(data)
    if patch is not None:
        patch(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks))


def edit_tensors(edit: Callable[[Raw], None], patch: Callable | None = None, meta: object = None):
    def mutate(base: Path) -> None:
        old_meta, raw = read_raw(base / WEIGHTS)
        edit(raw)
        write_raw(base / WEIGHTS, raw, meta if meta is not None else old_meta, patch)

    return mutate


def edit_header(patch: Callable[[dict], None]):
    return edit_tensors(lambda raw: None, patch=patch)


def edit_config(edit: Callable[[dict], object]):
    def mutate(base: Path) -> None:
        config = json.loads((base / "config.json").read_text())
        result = edit(config)
        (base / "config.json").write_text(json.dumps(config if result is None else result))

    return mutate


def set_value(name: str, value: float, dtype: str = "F32"):
    """Replace tensor ``name`` with ``dtype`` data holding ``value`` at index 3."""

    def edit(raw: Raw) -> None:
        _, shape, data = raw[name]
        array = np.frombuffer(data, "<f4").copy()
        array[3] = value
        if dtype == "F32":
            raw[name] = ("F32", shape, array.tobytes())
        elif dtype == "F16":
            raw[name] = ("F16", shape, array.astype("<f2").tobytes())
        else:  # BF16: the top half of each float32
            raw[name] = ("BF16", shape, (array.view("<u4") >> 16).astype("<u2").tobytes())

    return edit_tensors(edit)


def retype(name: str, dtype: str):
    def edit(raw: Raw) -> None:
        _, shape, data = raw[name]
        values = np.frombuffer(data, "<f4")
        as_type = {"I32": values.astype("<i4"), "F64": values.astype("<f8")}[dtype]
        raw[name] = (dtype, shape, as_type.tobytes())

    return edit_tensors(edit)


def write_bytes(name: str, payload: bytes | Callable[[bytes], bytes]):
    def mutate(base: Path) -> None:
        old = (base / name).read_bytes() if (base / name).exists() else b""
        (base / name).write_bytes(payload(old) if callable(payload) else payload)

    return mutate


def header_entry(name: str, **fields: object):
    return edit_header(lambda h: h[name].update(fields))


def _duplicate_shard(base: Path) -> None:
    _, raw = read_raw(base / WEIGHTS)
    write_raw(base / "model-extra.safetensors", {NORM: raw[NORM]})


def _pickle_only(base: Path) -> None:
    (base / WEIGHTS).unlink()
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04\x95" + b"\0" * 64)


def _index(weight_map: object):
    return write_bytes(
        "model.safetensors.index.json", json.dumps({"weight_map": weight_map}).encode()
    )


def _fifo_config(base: Path) -> None:
    (base / "config.json").unlink()
    os.mkfifo(base / "config.json")


TB_SHAPE = [1 << 20, 1 << 18]  # 2^38 float32 values = 1 TiB
BASE_CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    # -- the file is cut, flipped or is something else
    "truncated-half": (write_bytes(WEIGHTS, lambda b: b[: len(b) // 2]), ("truncated", WEIGHTS)),
    "truncated-to-4-bytes": (write_bytes(WEIGHTS, lambda b: b[:4]), ("truncated",)),
    "empty-weights": (write_bytes(WEIGHTS, b""), ("truncated",)),
    "header-length-flipped": (
        write_bytes(WEIGHTS, lambda b: b[:7] + b"\x7f" + b[8:]),
        ("header length",),
    ),
    "header-byte-flipped": (
        write_bytes(WEIGHTS, lambda b: b[:8] + b"\xff" + b[9:]),
        ("header is not JSON",),
    ),
    "header-is-a-list": (
        write_bytes(WEIGHTS, struct.pack("<Q", 2) + b"[]"),
        ("not a JSON object",),
    ),
    "pickle-renamed-safetensors": (
        write_bytes(WEIGHTS, b"\x80\x04\x95" + b"\0" * 64),
        ("pickle", "not unpickled"),
    ),
    "zip-renamed-safetensors": (write_bytes(WEIGHTS, b"PK\x03\x04" + b"\0" * 64), ("pickle",)),
    "pickle-bin-only": (_pickle_only, ("pytorch_model.bin", "pickle")),
    # -- the header lies
    "negative-shape": (header_entry(NORM, shape=[-8, -8]), (NORM, "malformed header entry")),
    "float-shape": (header_entry(NORM, shape=[64.0]), ("malformed header entry",)),
    "shape-claims-1TB": (header_entry(Q, shape=TB_SHAPE), (Q, "1099511627776")),
    "offsets-claim-1TB": (
        header_entry(Q, shape=TB_SHAPE, data_offsets=[0, 1 << 40]),
        (Q, "truncated"),
    ),
    "offsets-past-end": (
        edit_header(lambda h: h[NORM].update(data_offsets=[10**9, 10**9 + 256])),
        (NORM, "truncated"),
    ),
    "negative-offset": (header_entry(NORM, data_offsets=[-256, 0]), ("malformed",)),
    "overlapping-tensors": (
        edit_header(
            lambda h: h[NORM].update(
                data_offsets=h["model.layers.0.input_layernorm.weight"]["data_offsets"]
            )
        ),
        ("overlap",),
    ),
    "unknown-dtype": (header_entry(NORM, dtype="F128"), ("malformed header entry",)),
    "metadata-not-object": (edit_tensors(lambda r: None, meta=["x"]), ("__metadata__",)),
    # -- the values are not finite
    "nan-float32": (set_value(Q, math.nan), (Q, "NaN or Inf")),
    "inf-float32": (set_value(NORM, math.inf), (NORM, "NaN or Inf")),
    "nan-float16": (set_value(NORM, math.nan, "F16"), ("NaN or Inf",)),
    "inf-bfloat16": (set_value(NORM, -math.inf, "BF16"), ("NaN or Inf",)),
    # -- the tensor set does not match the architecture
    "int32-weight": (retype(Q, "I32"), (Q, "dtype I32")),
    "float64-weight": (retype(NORM, "F64"), (NORM, "dtype F64")),
    "missing-tensor": (
        edit_tensors(lambda r: r.pop("model.layers.1.mlp.down_proj.weight")),
        ("model.layers.1.mlp.down_proj.weight", "lack"),
    ),
    "extra-tensor": (
        edit_tensors(lambda r: r.update({"model.layers.0.extra.weight": ("F32", [1], b"\0" * 4)})),
        ("model.layers.0.extra.weight", "does not have"),
    ),
    "wrong-shape": (
        edit_tensors(lambda r: r.update({Q: ("F32", [32, 128], r[Q][2])})),
        (Q, "[32, 128]"),
    ),
    "tensor-in-two-shards": (_duplicate_shard, (NORM, "stored twice")),
    "index-escapes-dir": (_index({NORM: "../outside.safetensors"}), ("outside",)),
    "index-names-missing-shard": (_index({NORM: "model-00002.safetensors"}), ("missing",)),
    "index-not-json": (write_bytes("model.safetensors.index.json", b"{nope"), ("not valid JSON",)),
    "index-weight-map-list": (_index(["a"]), ("weight_map",)),
    # -- config.json
    "config-not-json": (write_bytes("config.json", b"{'hidden_size': 64"), ("not valid JSON",)),
    "config-too-large": (
        write_bytes("config.json", b"{" + b" " * (2 << 20) + b"}"),
        ("config.json", "limit"),
    ),
    "config-is-a-list": (edit_config(lambda c: [c]), ("expected an object",)),
    "config-not-utf8": (write_bytes("config.json", b'{"a": "\xff\xfe"}'), ("not valid JSON",)),
    "config-hidden-string": (
        edit_config(lambda c: c.update(hidden_size="64")),
        ("hidden_size='64'",),
    ),
    "config-negative-layers": (
        edit_config(lambda c: c.update(num_hidden_layers=-2)),
        ("num_hidden_layers=-2",),
    ),
    "config-absurd-layers": (
        edit_config(lambda c: c.update(num_hidden_layers=10**9)),
        ("num_hidden_layers=1000000000",),
    ),
    "config-bool-heads": (
        edit_config(lambda c: c.update(num_attention_heads=True)),
        ("num_attention_heads=True",),
    ),
    "config-heads-not-multiple": (
        edit_config(lambda c: c.update(num_key_value_heads=3)),
        ("num_key_value_heads=3",),
    ),
    "config-unknown-model-type": (
        edit_config(lambda c: c.update(model_type="llama-9000")),
        ("transformers cannot build",),
    ),
    "config-layers-vs-weights": (
        edit_config(lambda c: c.update(num_hidden_layers=3)),
        ("model.layers.2", "lack"),
    ),
    "config-is-a-fifo": (_fifo_config, ("not a regular file",)),
    "config-missing": (lambda b: (b / "config.json").unlink(), ("no config.json",)),
}


@pytest.mark.parametrize("case", sorted(BASE_CASES))
def test_hostile_base_dir(
    case: str, small_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mutate, needles = BASE_CASES[case]
    base = shutil.copytree(small_base, tmp_path / "base")
    mutate(base)
    out = tmp_path / "out"
    argv = ["build", "--profile", "t4-2gb", "--base", str(base), "--out", str(out)]
    assert_clean_failure(argv, capsys, out, *needles)


def _gguf_head(size: int) -> bytes:
    from rslora_deploy.data.assets import smollm2_gguf_path

    with smollm2_gguf_path().open("rb") as handle:
        return handle.read(size)


def _gguf_counts(version: int, tensors: int) -> bytes:
    head = _gguf_head(24)
    return head[:4] + struct.pack("<IQ", version, tensors) + head[16:24] + _gguf_head(4096)[24:]


GGUF_CASES: dict[str, tuple[Callable[[], bytes], tuple[str, ...]]] = {
    "gguf-cut-short": (lambda: _gguf_head(4 << 20), ("truncated",)),
    "gguf-cut-in-metadata": (lambda: _gguf_head(300), ("truncated or corrupted",)),
    "gguf-empty": (lambda: b"", ("not a GGUF",)),
    "gguf-wrong-magic": (lambda: b"GGML" + _gguf_head(4096)[4:], ("not a GGUF",)),
    "gguf-absurd-tensor-count": (lambda: _gguf_counts(3, 1 << 40), ("1099511627776 tensors",)),
    "gguf-unknown-version": (lambda: _gguf_counts(99, 272), ("version 99",)),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_hostile_gguf(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, needles = GGUF_CASES[case]
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(make())
    out = tmp_path / "out"
    argv = ["build", "--profile", "t4-2gb", "--base", str(gguf), "--out", str(out)]
    assert_clean_failure(argv, capsys, out, *needles)
