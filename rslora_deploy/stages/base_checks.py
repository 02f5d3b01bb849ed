"""Checks of a base model directory before any of it is loaded: the base is untrusted input.

Run by the ``load`` stage, in this order, each failing with one line naming the file or tensor:

1. ``config.json``: size-capped JSON object with sane hyper-parameters (:mod:`model_view`).
2. Weight files: only safetensors (never pickle); a shard index must name plain files inside the
   directory. Every header is parsed by :class:`~rslora_deploy.adapters.st_io.SafetensorsFile`
   before a byte of data is read: non-negative integer shapes, offsets inside the file, byte
   counts that match dtype x shape, no overlapping tensors. So a header that claims a 1 TB tensor
   fails on arithmetic, never on an allocation.
3. The tensor set against the architecture: the model is built on the ``meta`` device (no memory)
   and every parameter must be present with its shape and a float dtype; no tensor may be extra.
   transformers would otherwise initialize a missing weight at random, with only a warning.
4. Finiteness: every float tensor is scanned for NaN/Inf through a memory map, in chunks, by its
   exponent bits (all ones = Inf or NaN, for F32/F16/BF16 alike).

An already-quantized checkpoint (``quantization_config`` in config.json) skips 3 and 4's integer
tensors; its layout is checked by :func:`rslora_deploy.quantizers.checkpoint.check_prequantized`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from rslora_deploy.adapters.st_io import SafetensorsFile
from rslora_deploy.errors import AdapterFormatError, InputError, UnsupportedError
from rslora_deploy.model_view import model_view, read_config
from rslora_deploy.untrusted import confined, read_json

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "F16", "BF16")
# Exponent mask per float dtype, read as an unsigned integer of the same width.
_EXPONENT = {"F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}
_SCAN_CHUNK = 1 << 24  # elements per finiteness chunk: bounds the temporaries to ~64 MB
# Buffers some checkpoints carry that transformers recomputes (old Llama exports).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def check_base_model(base_dir: Path) -> None:
    """Run every check above on ``base_dir``.

    Raises:
        InputError: a malformed config, weight file, tensor set or non-finite weight.
        UnsupportedError: an architecture transformers cannot build.
    """
    start = time.perf_counter()
    config = read_config(base_dir)
    files = safetensors_headers(base_dir)
    model_view(base_dir)  # bounded hyper-parameters before anything is built from them
    tensors = _tensor_index(files)
    quantized = config.get("quantization_config") is not None
    if not quantized:
        check_tensor_set(base_dir, tensors)
    check_finite(files)
    logger.info(
        "load: base weights checked (%d tensors in %d files) in %.1f s",
        len(tensors),
        len(files),
        time.perf_counter() - start,
    )


def safetensors_headers(base_dir: Path) -> list[SafetensorsFile]:
    """The parsed headers of the base's weight files (the index's shards, else ``*.safetensors``).

    Raises:
        InputError: no safetensors, a pickle checkpoint, an index naming files outside the
            directory or missing, or a malformed header.
    """
    base_dir = Path(base_dir)
    index = base_dir / INDEX
    if index.is_file():
        weight_map = read_json(index, "shard index", fix="re-save the model").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index} has no 'weight_map' object; re-save the model")
        paths = sorted({confined(base_dir, name, str(index)) for name in weight_map.values()})
    else:
        paths = sorted(base_dir.glob("*.safetensors"))
    if not paths:
        pickled = sorted(p.name for p in base_dir.glob("*.bin"))
        hint = (
            f" (found {', '.join(pickled)}: pickle checkpoints are not loaded)" if pickled else ""
        )
        raise InputError(
            f"base model directory {base_dir} holds no .safetensors weights{hint}; re-save it "
            "with save_pretrained(safe_serialization=True)"
        )
    headers = []
    for path in paths:
        if not path.is_file():
            raise InputError(f"{index} names shard {path.name}, which is missing; re-download it")
        try:
            headers.append(SafetensorsFile(path))
        except AdapterFormatError as exc:
            raise InputError(f"base weights: {exc.message}") from None
    return headers


def _tensor_index(files: list[SafetensorsFile]) -> dict[str, SafetensorsFile]:
    index: dict[str, SafetensorsFile] = {}
    for handle in files:
        for name in handle.entries:
            if name in index:
                raise InputError(
                    f"tensor {name!r} is stored twice ({index[name].path.name} and "
                    f"{handle.path.name}); the checkpoint is inconsistent, re-save it"
                )
            index[name] = handle
    return index


def expected_parameters(base_dir: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, set[str]]]:
    """``(name -> shape, name -> names sharing its storage)`` of the model its config describes.

    Built on the ``meta`` device: no weights are read and nothing is allocated.

    Raises:
        UnsupportedError: transformers cannot build the architecture from this config.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UnsupportedError(
            f"transformers cannot build the model described by {base_dir}/config.json ({first}); "
            "pass a causal LM of a supported architecture (Llama, Qwen2, Qwen3, Mistral, Phi-3, "
            "Gemma-3, GLM-4)"
        ) from None
    shapes: dict[str, tuple[int, ...]] = {}
    groups: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shapes[name] = tuple(param.shape)
        groups.setdefault(id(param), set()).add(name)
    for name, buf in model.named_buffers(remove_duplicate=False):
        if name in model.state_dict():  # persistent buffers are saved too
            shapes[name] = tuple(buf.shape)
            groups.setdefault(id(buf), set()).add(name)
    tied = {name: group for group in groups.values() for name in group}
    return shapes, tied


def check_tensor_set(base_dir: Path, tensors: dict[str, SafetensorsFile]) -> None:
    """Every parameter present with its shape and a float dtype; nothing extra.

    Raises:
        InputError: naming the first missing, extra, mis-shaped or non-float tensor.
    """
    shapes, tied = expected_parameters(base_dir)
    stored = {name: name for name in tensors}
    if not any(name in shapes for name in tensors):
        # A bare decoder checkpoint (LlamaModel) stores names without the wrapper's prefix.
        prefixed = {f"model.{name}": name for name in tensors}
        if any(name in shapes for name in prefixed):
            stored = prefixed
    for name, shape in shapes.items():
        if name not in stored and not (tied[name] & stored.keys()):
            raise InputError(
                f"base weights lack tensor {name!r} {list(shape)} that config.json's architecture "
                "needs; the checkpoint is incomplete or for another model, re-download it"
            )
    for name, original in stored.items():
        handle = tensors[original]
        if name not in shapes:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            raise InputError(
                f"base weights hold tensor {original!r} ({handle.path.name}) that the "
                "architecture in config.json does not have; the checkpoint and config.json do "
                "not match"
            )
        if handle.shape(original) != shapes[name]:
            raise InputError(
                f"base tensor {original!r} has shape {list(handle.shape(original))}, config.json "
                f"implies {list(shapes[name])}; the checkpoint and config.json do not match"
            )
        if handle.dtype(original) not in FLOAT_DTYPES:
            raise InputError(
                f"base tensor {original!r} has dtype {handle.dtype(original)}, expected one of "
                f"{', '.join(FLOAT_DTYPES)}; re-save the model in float32, float16 or bfloat16"
            )


def check_finite(files: list[SafetensorsFile]) -> None:
    """Scan every F32/F16/BF16 tensor for NaN or Inf without loading it.

    A bitsandbytes 4-bit weight's packed codes are skipped: with a float
    ``bnb_4bit_quant_storage`` they are stored as F16/BF16/F32 but are bytes, not numbers (its
    dequantization is scanned instead, docs/qlora.md).

    Raises:
        InputError: naming the first tensor with a non-finite value.
    """
    from rslora_deploy.quantizers.bnb4 import STATE_PREFIX

    marker = f".{STATE_PREFIX}"
    packed = {k.partition(marker)[0] for h in files for k in h.entries if marker in k}
    for handle in files:
        for name in handle.entries:
            dtype = handle.dtype(name)
            if name in packed:
                continue
            if dtype in _EXPONENT and not _all_finite(handle, name, *_EXPONENT[dtype]):
                raise InputError(
                    f"base tensor {name!r} in {handle.path.name} holds NaN or Inf values; "
                    "the weights are corrupted, re-download or re-export the model"
                )


def _all_finite(handle: SafetensorsFile, name: str, uint: str, mask: int) -> bool:
    start, stop = handle.entries[name]["data_offsets"]
    count = (stop - start) // np.dtype(uint).itemsize
    if count == 0:
        return True
    data: Any = np.memmap(
        handle.path, dtype=uint, mode="r", offset=handle.data_start + start, shape=(count,)
    )
    typed_mask = np.array(mask, dtype=uint)
    for begin in range(0, count, _SCAN_CHUNK):
        chunk = data[begin : begin + _SCAN_CHUNK]
        if np.any((chunk & typed_mask) == typed_mask):
            return False
    return True


_GGUF_MAGIC = b"GGUF"
_GGUF_MAX_COUNT = 1_000_000  # tensors or metadata keys; real files have hundreds


def check_gguf(path: Path) -> None:
    """Check a ``.gguf`` base before transformers dequantizes it.

    The fixed header (magic, version, counts) is read first, then gguf-py's reader parses the
    metadata and tensor table through a memory map, and every tensor's data must end inside the
    file. A file cut short fails here, naming the first tensor past the end.

    Raises:
        InputError: not a GGUF, an unsupported version, absurd counts, or a truncated file.
    """
    import struct

    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(24)
    if len(head) < 24 or head[:4] != _GGUF_MAGIC:
        raise InputError(
            f"{path} is not a GGUF file (no GGUF magic in its first bytes, {size} bytes long); "
            "pass a llama.cpp .gguf or a Hugging Face directory"
        )
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3) or n_tensors > _GGUF_MAX_COUNT or n_kv > _GGUF_MAX_COUNT:
        raise InputError(
            f"{path}: GGUF header claims version {version}, {n_tensors} tensors and {n_kv} "
            "metadata keys; the file is corrupted (versions 2-3 are supported)"
        )
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # noqa: BLE001 - gguf-py raises many types on a damaged file
        raise InputError(
            f"{path} is truncated or corrupted: its GGUF metadata cannot be parsed "
            f"({type(exc).__name__}: {str(exc)[:150]}); re-download it"
        ) from None
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise InputError(
                f"{path} is truncated: tensor {tensor.name!r} ends at byte {end}, the file has "
                f"{size}; re-download it"
            )
