"""Strict safetensors reading for untrusted adapter and base files.

We parse the header ourselves before touching any data so that a truncated, corrupted or
mislabelled file (a pickle renamed to ``.safetensors``) fails with a one-line message that names
the file, instead of a backend panic. Nothing here ever unpickles.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

from rslora_deploy.errors import AdapterFormatError

_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_NUMPY = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
    "U16": "<u2",
    "U32": "<u4",
    "U64": "<u8",
}
# 100 MB: real headers are kilobytes; a larger value means corruption, and reading it would be a
# memory hazard.
_MAX_HEADER = 100_000_000


def _entry_fields(entry: Any) -> tuple[Any, list[int] | None, tuple[int, int] | None]:
    """``(dtype, shape, (start, stop))`` of a header entry; None for a field of the wrong type."""
    if not isinstance(entry, dict):
        return None, None, None
    shape = entry.get("shape")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        shape = None
    offsets = entry.get("data_offsets")
    if isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets):
        return entry.get("dtype"), shape, (offsets[0], offsets[1])
    return entry.get("dtype"), shape, None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsFile:
    """A validated safetensors file: its header, metadata and lazily read tensors.

    Args:
        path: the ``.safetensors`` file; its header is read and checked on construction.

    Raises:
        AdapterFormatError: missing file, pickle/zip content, truncated or inconsistent header.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with self.path.open("rb") as handle:
                head = handle.read(8)
                if len(head) < 8:
                    raise AdapterFormatError(
                        f"{self.path} is truncated: {size} bytes, a safetensors file has at least "
                        "8; re-save or re-download it"
                    )
                (length,) = struct.unpack("<Q", head)
                first = handle.read(1) if length <= size - 8 else b""
                # A safetensors header is JSON and starts with "{"; a pickle starts with \x80
                # (protocol 2+) and torch.save's zip archive with "PK". Refuse both, unread.
                if first != b"{" and (head[:1] == b"\x80" or head[:2] == b"PK"):
                    raise AdapterFormatError(
                        f"{self.path} is a pickle/torch archive, not safetensors (starts with "
                        f"{head[:2]!r}); it was not unpickled. Re-save it with safetensors"
                    )
                handle.seek(8)
                if length > min(_MAX_HEADER, size - 8):
                    raise AdapterFormatError(
                        f"{self.path} is not a valid safetensors file: header length {length} "
                        f"exceeds the file size {size}; it is truncated or corrupted"
                    )
                raw = handle.read(length)
        except OSError as exc:
            raise AdapterFormatError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (UnicodeDecodeError, ValueError) as exc:
            raise AdapterFormatError(
                f"{self.path} is not a valid safetensors file: header is not JSON ({exc}); "
                "it is corrupted"
            ) from None
        self.data_start = 8 + length
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict[str, Any]] = header
        self._check(size - self.data_start)

    def _check(self, data_size: int) -> None:
        if not isinstance(self.metadata, dict):
            raise AdapterFormatError(f"{self.path}: __metadata__ is not an object; it is corrupted")
        spans = []
        for name, entry in self.entries.items():
            dtype, shape, offsets = _entry_fields(entry)
            if dtype not in _ITEMSIZE or shape is None or offsets is None:
                raise AdapterFormatError(
                    f"{self.path}: tensor {name!r} has a malformed header entry {str(entry)[:200]} "
                    "(dtype, non-negative integer shape and two integer data_offsets needed); "
                    "the file is corrupted"
                )
            start, stop = offsets
            # Arithmetic on the header only: a shape claiming a terabyte fails here, unallocated.
            nbytes = _ITEMSIZE[dtype] * math.prod(shape)
            if stop - start != nbytes or start < 0:
                raise AdapterFormatError(
                    f"{self.path}: tensor {name!r} spans {stop - start} bytes, expected {nbytes} "
                    f"for {dtype}{shape}; the file is corrupted"
                )
            if stop > data_size:
                raise AdapterFormatError(
                    f"{self.path} is truncated: tensor {name!r} ends at data byte {stop}, the file "
                    f"has {data_size}; re-save or re-download it"
                )
            spans.append((start, stop, name))
        spans.sort()
        for (_, prev_stop, prev), (start, _, name) in zip(spans, spans[1:], strict=False):
            if start < prev_stop:
                raise AdapterFormatError(
                    f"{self.path}: tensors {prev!r} and {name!r} overlap in the data buffer; "
                    "the file is corrupted"
                )

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.entries)

    def dtype(self, name: str) -> str:
        """The safetensors dtype string of a tensor (``F32``, ``BF16``...)."""
        return str(self.entries[name]["dtype"])

    def shape(self, name: str) -> tuple[int, ...]:
        """Stored shape of a tensor."""
        return tuple(int(d) for d in self.entries[name]["shape"])

    def raw_bytes(self, name: str) -> bytes:
        """The tensor's bytes exactly as stored (used for base-weight hashes)."""
        start, stop = self.entries[name]["data_offsets"]
        with self.path.open("rb") as handle:
            handle.seek(self.data_start + start)
            return handle.read(stop - start)

    def numpy(self, name: str) -> np.ndarray:
        """Load one tensor as a numpy array (BF16 widened exactly to float32)."""
        dtype, shape = self.dtype(name), self.shape(name)
        raw = self.raw_bytes(name)
        if dtype == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << np.uint32(16)
            return bits.view(np.float32).reshape(shape)
        if dtype not in _NUMPY:
            raise AdapterFormatError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
        return np.frombuffer(raw, dtype=_NUMPY[dtype]).reshape(shape).copy()
