"""Dequantize a bitsandbytes 4-bit (QLoRA) base checkpoint with numpy, without bitsandbytes.

A QLoRA adapter is trained over a base loaded with ``BitsAndBytesConfig(load_in_4bit=True)``.
Its linear weights are NF4 or FP4 codes, and the weights the adapter was trained against are
the *dequantized* ones, Wq. We read the checkpoint, rebuild Wq exactly, and hand the rest of the
pipeline a plain HF directory; the adapter is then merged into Wq in fp32 like into any base, and
never re-quantized to NF4 (the deployment quantizer, GPTQ/AWQ/RTN, runs after the merge).

The format, as transformers 5 ``save_pretrained`` writes it (checked against bitsandbytes 0.50.2;
``tests/unit/quantizers/test_bnb4.py`` compares every case below with its ``dequantize_4bit``):

* ``config.json`` holds ``quantization_config`` with ``quant_method: "bitsandbytes"`` and
  ``load_in_4bit: true`` (plus ``bnb_4bit_quant_type``, ``bnb_4bit_use_double_quant``,
  ``bnb_4bit_compute_dtype``, ``bnb_4bit_quant_storage``). Modules that were not quantized
  (``lm_head``, embeddings, norms, ``llm_int8_skip_modules``) are ordinary float tensors.
* Each quantized weight ``NAME`` (logical shape ``[out, in]``) is stored as

  ====================================================  =========================================
  ``NAME``                                              the codes, two per byte: ``U8 [ceil(n/2),
                                                        1]`` (another dtype with a non-uint8
                                                        ``bnb_4bit_quant_storage``: same bytes)
  ``NAME.absmax``                                       ``F32 [blocks]``; ``U8 [blocks]`` with
                                                        double quantization
  ``NAME.quant_map``                                    ``F32 [16]``: the code book
  ``NAME.nested_absmax``, ``NAME.nested_quant_map``     double quantization only: ``F32
                                                        [ceil(blocks/nested_blocksize)]``, ``F32
                                                        [256]``
  ``NAME.quant_state.bitsandbytes__nf4`` (``__fp4``)    ``U8`` bytes of a UTF-8 JSON object:
                                                        ``quant_type``, ``blocksize``, ``dtype``,
                                                        ``shape``; with double quantization also
                                                        ``nested_blocksize``, ``nested_dtype``,
                                                        ``nested_offset``
  ====================================================  =========================================

The formula, with ``n = prod(shape)`` and the weight flattened row-major:

* element ``i`` has code ``c[i]``: byte ``i // 2``, its **high** nibble for even ``i``, its low
  nibble for odd ``i``;
* blocks run over the flat weight, not per row: element ``i`` is in block ``i // blocksize``,
  ``blocks = ceil(n / blocksize)``, and the last block may be partial (the format allows a
  ``blocksize`` that does not divide ``n``; bitsandbytes' ``quantize_4bit`` writes one);
* with double quantization the block scales are themselves 8-bit codes:
  ``absmax[j] = nested_quant_map[absmax_u8[j]] * nested_absmax[j // nested_blocksize]
  + nested_offset``, the product rounded to fp32 and then the sum;
* ``w[i] = quant_map[c[i]] * absmax[i // blocksize]``, one fp32 product.

bitsandbytes ignores the stored ``quant_map`` for 4-bit (its kernels use a built-in table), so
a map other than the standard NF4/FP4 one would dequantize differently there and here: it is
refused rather than silently trusted. FP4 is sign-magnitude, so its code 8 is "-0": the stored
map and bitsandbytes' pure-torch path give ``+0.0`` for it, its CPU C kernel gives ``-0.0`` for
some shapes and ``+0.0`` for others. We give ``+0.0``; the two are equal in every operation the
merge does, and the tests compare bits with the sign of zero ignored.

Output dtype: everything is written in **float32**. Every fp32 product above is exact in fp32
and is what bitsandbytes computes before casting to the checkpoint's ``dtype`` /
``bnb_4bit_compute_dtype``; the merge runs in fp32 anyway, so casting to bf16 first would only add
a rounding to Wq. Unquantized F16/BF16 tensors are widened exactly.

bitsandbytes 0.50.2's CPU C kernel blocks a 2-D weight per row, which is wrong when a row is not
a multiple of ``blocksize`` (measured: max error 0.10 instead of 0.016 on N(0, 0.05) weights);
its pure-torch fallback and its quantizer use flat blocks, as we do.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rslora_deploy.adapters.st_io import SafetensorsFile
from rslora_deploy.errors import Bnb4CheckpointError, UnsupportedError

logger = logging.getLogger(__name__)

#: The suffix of the JSON quant-state tensor, per quant type.
STATE_PREFIX = "quant_state.bitsandbytes__"
QUANT_TYPES = ("nf4", "fp4")
#: Block sizes bitsandbytes' ``dequantize_4bit`` accepts.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPANIONS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_MAX_STATE_BYTES = 1 << 16  # a quant-state JSON is ~170 bytes

#: NF4: quantiles of N(0, 1) scaled to [-1, 1] with an exact zero (QLoRA, Dettmers et al. 2023).
NF4_MAP = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip
_FP4_MAGNITUDES = [0.0, 1 / 192, 4 / 6, 6 / 6, 2 / 6, 3 / 6, 1 / 6, 1.5 / 6]
#: FP4: sign bit (bit 3), then 2 exponent bits and 1 mantissa bit, normalized to a maximum of 1.
#: Code 8 ("-0") is stored as +0.0, as bitsandbytes writes it.
FP4_MAP = np.array(_FP4_MAGNITUDES + [0.0 - m for m in _FP4_MAGNITUDES], dtype=np.float32)
STANDARD_MAPS = {"nf4": NF4_MAP, "fp4": FP4_MAP}


@dataclass(frozen=True)
class QuantState:
    """The parsed ``quant_state.bitsandbytes__*`` JSON of one weight."""

    quant_type: str
    blocksize: int
    shape: tuple[int, ...]
    dtype: str
    nested_blocksize: int | None = None
    nested_offset: float | None = None

    @property
    def numel(self) -> int:
        """Elements of the logical weight."""
        return math.prod(self.shape)

    @property
    def blocks(self) -> int:
        """Number of absmax blocks over the flat weight (the last may be partial)."""
        return -(-self.numel // self.blocksize)


def bnb4_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The ``quantization_config`` of a bitsandbytes 4-bit checkpoint's config, else None.

    Raises:
        UnsupportedError: a bitsandbytes 8-bit checkpoint (LLM.int8() is not dequantized here).
    """
    qcfg = config.get("quantization_config")
    if not isinstance(qcfg, dict) or str(qcfg.get("quant_method", "")).lower() != "bitsandbytes":
        return None
    if qcfg.get("load_in_4bit") is True or qcfg.get("_load_in_4bit") is True:
        return qcfg
    raise UnsupportedError(
        "config.json quantization_config is bitsandbytes without load_in_4bit (an 8-bit "
        "LLM.int8() checkpoint); only 4-bit (nf4/fp4, QLoRA) bases are dequantized, pass the "
        "full-precision base instead"
    )


def parse_quant_state(name: str, raw: bytes, suffix_type: str) -> QuantState:
    """Parse and check the JSON quant state stored in ``NAME.quant_state.bitsandbytes__X``.

    Args:
        name: the weight's tensor name (for messages).
        raw: the tensor's bytes.
        suffix_type: the ``X`` of the tensor name (the quant type it claims).

    Raises:
        Bnb4CheckpointError: not a JSON object, a missing or ill-typed field, an unknown quant
            type or one that disagrees with the tensor name, a block size bitsandbytes does not
            use.
    """
    where = f"{name}.{STATE_PREFIX}{suffix_type}"
    if suffix_type not in QUANT_TYPES:
        raise Bnb4CheckpointError(
            f"tensor {where!r} names quant type {suffix_type!r}; expected one of "
            f"{', '.join(QUANT_TYPES)}"
        )
    try:
        state = json.loads(raw.decode("utf-8")) if len(raw) <= _MAX_STATE_BYTES else None
    except (UnicodeDecodeError, ValueError):
        state = None
    if not isinstance(state, dict):
        raise Bnb4CheckpointError(
            f"tensor {where!r} is not the UTF-8 JSON object of a bitsandbytes quant state "
            f"({len(raw)} bytes); re-save the checkpoint"
        )
    quant_type = _field(state, "quant_type", str, where)
    if quant_type not in QUANT_TYPES or quant_type != suffix_type:
        raise Bnb4CheckpointError(
            f"tensor {where!r} has quant_type {quant_type!r}; expected {suffix_type!r} (the "
            f"tensor name's), one of {', '.join(QUANT_TYPES)}"
        )
    blocksize = _field(state, "blocksize", int, where)
    if blocksize not in BLOCKSIZES:
        raise Bnb4CheckpointError(
            f"tensor {where!r} has blocksize {blocksize}; expected one of "
            f"{', '.join(map(str, BLOCKSIZES))}"
        )
    shape = _field(state, "shape", list, where)
    if not shape or not all(_is_positive_int(d) for d in shape):
        raise Bnb4CheckpointError(
            f"tensor {where!r} has shape {str(shape)[:80]}; expected a list of positive integers"
        )
    dtype = _field(state, "dtype", str, where)
    nested_blocksize = nested_offset = None
    if any(k.startswith("nested_") for k in state):
        nested_blocksize = _field(state, "nested_blocksize", int, where)
        if nested_blocksize <= 0:
            raise Bnb4CheckpointError(
                f"tensor {where!r} has nested_blocksize {nested_blocksize}; expected > 0"
            )
        nested_offset = float(_field(state, "nested_offset", (int, float), where))
        if not math.isfinite(nested_offset):
            raise Bnb4CheckpointError(f"tensor {where!r} has a non-finite nested_offset")
    return QuantState(quant_type, blocksize, tuple(shape), dtype, nested_blocksize, nested_offset)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _field(state: dict[str, Any], key: str, kind: Any, where: str) -> Any:
    value = state.get(key)
    if key not in state or isinstance(value, bool) or not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join(k.__name__ for k in kinds)
        got = "missing" if key not in state else f"{type(value).__name__} {str(value)[:40]}"
        raise Bnb4CheckpointError(
            f"tensor {where!r}: quant_state field {key!r} is {got}; expected {expected}"
        )
    return value


def unpack_codes(packed: np.ndarray, numel: int) -> np.ndarray:
    """The 4-bit codes of ``packed`` (uint8, two per byte, high nibble first), ``numel`` of them."""
    flat = np.ascontiguousarray(packed).reshape(-1).view(np.uint8)
    codes = np.empty(flat.size * 2, dtype=np.uint8)
    codes[0::2] = flat >> 4
    codes[1::2] = flat & 0x0F
    return codes[:numel]


def blockwise_scale(values: np.ndarray, scales: np.ndarray, blocksize: int) -> np.ndarray:
    """Multiply ``values`` (flat, float32, in place) block by block by ``scales`` (float32)."""
    full = values.size - values.size % blocksize
    body = values[:full].reshape(-1, blocksize)
    body *= scales[: full // blocksize, None]
    if full < values.size:
        values[full:] *= scales[-1]
    return values


def dequantize_weight(name: str, state: QuantState, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """Rebuild one weight in float32 from its stored tensors (see the module docstring).

    Args:
        name: the weight's tensor name.
        state: its parsed quant state.
        tensors: ``""`` (the packed codes, any dtype: its bytes are read), ``"absmax"``,
            ``"quant_map"`` and, with double quantization, ``"nested_absmax"`` and
            ``"nested_quant_map"``, as numpy arrays.

    Returns:
        The weight, float32, of ``state.shape``.

    Raises:
        Bnb4CheckpointError: a missing tensor, or one whose size or dtype disagrees with the
            quant state.
    """
    packed = _need(tensors, "", name)
    n = state.numel
    nbytes = -(-n // 2)
    if packed.nbytes < nbytes or packed.nbytes - nbytes >= max(packed.itemsize, 1):
        raise Bnb4CheckpointError(
            f"tensor {name!r} holds {packed.nbytes} bytes of 4-bit codes; expected {nbytes} for "
            f"shape {list(state.shape)} (two codes per byte)"
        )
    quant_map = _need(tensors, "quant_map", name)
    standard = STANDARD_MAPS[state.quant_type]
    if quant_map.shape != (16,) or not np.array_equal(quant_map.astype(np.float32), standard):
        raise Bnb4CheckpointError(
            f"tensor {name + '.quant_map'!r} is not the standard {state.quant_type} code book "
            f"(16 values, shape {list(quant_map.shape)} stored); bitsandbytes ignores a stored "
            "map, so this checkpoint's weights are ambiguous: re-save it"
        )
    absmax = _block_scales(name, state, tensors)
    # One gather per byte instead of unpacking nibbles first: byte b -> (map[b >> 4], map[b & 15]).
    # (a 1-D gather of 8-byte pairs: 256 entries, each two float32 viewed as one uint64).
    pairs = np.stack([np.repeat(standard, 16), np.tile(standard, 16)], axis=1)
    codes = np.ascontiguousarray(packed).reshape(-1).view(np.uint8)[:nbytes]
    values = pairs.view(np.uint64).reshape(256)[codes].view(np.float32)[:n]
    return blockwise_scale(values, absmax, state.blocksize).reshape(state.shape)


def _block_scales(name: str, state: QuantState, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The per-block fp32 absmax, undoing the double quantization when there is one."""
    absmax = _need(tensors, "absmax", name).reshape(-1)
    if absmax.size != state.blocks:
        raise Bnb4CheckpointError(
            f"tensor {name + '.absmax'!r} has {absmax.size} blocks; expected {state.blocks} = "
            f"ceil({state.numel} / blocksize {state.blocksize}) for shape {list(state.shape)}"
        )
    nested = state.nested_blocksize is not None
    if nested != ("nested_absmax" in tensors):
        have = "has" if "nested_absmax" in tensors else "lacks"
        raise Bnb4CheckpointError(
            f"tensor {name + '.nested_absmax'!r}: the checkpoint {have} it but the quant state "
            f"{'declares' if nested else 'does not declare'} double quantization (nested_*); "
            "expected both or neither"
        )
    if not nested:
        if absmax.dtype.kind != "f":
            raise Bnb4CheckpointError(
                f"tensor {name + '.absmax'!r} is {absmax.dtype}; expected float32 without "
                "double quantization"
            )
        return absmax.astype(np.float32)
    if absmax.dtype != np.uint8:
        raise Bnb4CheckpointError(
            f"tensor {name + '.absmax'!r} is {absmax.dtype}; expected uint8 codes with double "
            "quantization"
        )
    nested_map = _need(tensors, "nested_quant_map", name).reshape(-1).astype(np.float32)
    nested_absmax = _need(tensors, "nested_absmax", name).reshape(-1).astype(np.float32)
    assert state.nested_blocksize is not None
    assert state.nested_offset is not None
    groups = -(-absmax.size // state.nested_blocksize)
    if nested_map.size != 256 or nested_absmax.size != groups:
        raise Bnb4CheckpointError(
            f"tensors {name + '.nested_quant_map'!r} / {name + '.nested_absmax'!r} have "
            f"{nested_map.size} / {nested_absmax.size} values; expected 256 / {groups} = "
            f"ceil({absmax.size} / nested_blocksize {state.nested_blocksize})"
        )
    scales = blockwise_scale(nested_map[absmax], nested_absmax, state.nested_blocksize)
    scales += np.float32(state.nested_offset)
    return scales


def _need(tensors: dict[str, np.ndarray], part: str, name: str) -> np.ndarray:
    if part not in tensors:
        full = f"{name}.{part}" if part else name
        raise Bnb4CheckpointError(
            f"bitsandbytes 4-bit weight {name!r} lacks tensor {full!r}; expected it beside "
            f"{name}.{STATE_PREFIX}*"
        )
    return tensors[part]


@dataclass
class _Weight:
    """One quantized weight of a checkpoint: its name, quant state and where its parts are."""

    name: str
    state: QuantState
    parts: dict[str, tuple[SafetensorsFile, str]]


def _index(files: list[SafetensorsFile]) -> dict[str, SafetensorsFile]:
    index: dict[str, SafetensorsFile] = {}
    for handle in files:
        for key in handle.entries:
            index[key] = handle
    return index


def find_weights(files: list[SafetensorsFile]) -> dict[str, _Weight]:
    """Every quantized weight of the checkpoint, keyed by name, with its parsed quant state.

    Raises:
        Bnb4CheckpointError: a quant state that does not parse, or a companion tensor
            (``absmax``, ``quant_map``, ``nested_*``) with no quant state beside it.
    """
    index = _index(files)
    weights: dict[str, _Weight] = {}
    for key, handle in index.items():
        if f".{STATE_PREFIX}" not in key:
            continue
        name, _, suffix_type = key.partition(f".{STATE_PREFIX}")
        state = parse_quant_state(name, handle.raw_bytes(key), suffix_type)
        parts = {"": name, **{c: f"{name}.{c}" for c in COMPANIONS}}
        weights[name] = _Weight(
            name, state, {p: (index[k], k) for p, k in parts.items() if k in index}
        )
    for key in index:
        owner, _, part = key.rpartition(".")
        if part in COMPANIONS and owner not in weights:
            raise Bnb4CheckpointError(
                f"tensor {key!r} is a bitsandbytes 4-bit companion but {owner!r} has no "
                f"{owner}.{STATE_PREFIX}nf4 (or __fp4) quant state; expected one for every "
                "quantized weight"
            )
    return weights


def _read_weight(weight: _Weight) -> np.ndarray:
    arrays: dict[str, np.ndarray] = {}
    for part, (handle, key) in weight.parts.items():
        if part == "":  # the codes: raw bytes, whatever dtype bnb_4bit_quant_storage gave them
            arrays[part] = np.frombuffer(handle.raw_bytes(key), dtype=np.uint8)
        else:
            arrays[part] = handle.numpy(key)
    return dequantize_weight(weight.name, weight.state, arrays)


def _plain_tensor(handle: SafetensorsFile, key: str) -> np.ndarray:
    """An unquantized tensor; floats are widened exactly to float32."""
    array = handle.numpy(key)
    return array.astype(np.float32) if array.dtype.kind == "f" else array


def dequantize_checkpoint(
    src_dir: Path, out_dir: Path, files: list[SafetensorsFile]
) -> dict[str, Any]:
    """Write ``out_dir``: ``src_dir``'s bnb 4-bit weights dequantized to float32, plus config.json.

    One output shard per input shard (same file names, an index when the input had one), so the
    peak memory is one shard's float32 weights. ``config.json`` loses its
    ``quantization_config`` and says ``float32``. Tokenizer and generation files are the
    caller's to copy.

    Args:
        src_dir: the checkpoint directory (its config.json is read).
        out_dir: an existing, empty directory.
        files: the checkpoint's parsed safetensors headers (the shards).

    Returns:
        What the manifest records: quant method, bits, quant types, block sizes, double
        quantization, compute dtype, number of dequantized weights, dtype written.

    Raises:
        Bnb4CheckpointError: any malformed weight (see :func:`dequantize_weight`), or a config
            that declares bitsandbytes 4-bit while no weight carries a quant state.
    """
    from safetensors.numpy import save_file

    from rslora_deploy.model_view import read_config

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    config = read_config(src_dir)
    qcfg = bnb4_config(config) or {}
    weights = find_weights(files)
    if not weights:
        raise Bnb4CheckpointError(
            f"{src_dir}/config.json declares bitsandbytes load_in_4bit but no tensor has a "
            f"{STATE_PREFIX}nf4/fp4 quant state; expected the checkpoint transformers' "
            "save_pretrained writes"
        )
    owned = {key for w in weights.values() for _, key in w.parts.values()}
    owned |= {f"{w.name}.{STATE_PREFIX}{w.state.quant_type}" for w in weights.values()}
    weight_map: dict[str, str] = {}
    for handle in files:
        out: dict[str, np.ndarray] = {}
        for key in handle.entries:
            if key in weights:
                out[key] = _read_weight(weights[key])
            elif key not in owned:
                out[key] = _plain_tensor(handle, key)
        save_file(out, str(out_dir / handle.path.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, handle.path.name))
        logger.info("dequantized %s (%d tensors)", handle.path.name, len(out))
    if len(files) > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _write_plain_config(config, out_dir)
    states = [w.state for w in weights.values()]
    return {
        "quant_method": "bitsandbytes",
        "bits": 4,
        "quant_type": "+".join(sorted({s.quant_type for s in states})),
        "blocksize": sorted({s.blocksize for s in states}),
        "double_quant": any(s.nested_blocksize is not None for s in states),
        "compute_dtype": str(qcfg.get("bnb_4bit_compute_dtype", "float32")),
        "weights": len(weights),
        "dequantized_dtype": "float32",
    }


def _write_plain_config(config: dict[str, Any], out_dir: Path) -> None:
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    plain["dtype"] = "float32"
    if "torch_dtype" in plain:
        plain["torch_dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(plain, indent=2) + "\n", encoding="utf-8")
