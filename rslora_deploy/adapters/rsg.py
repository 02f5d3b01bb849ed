"""RSG-1: the portable, counter-based generator of RS-LoRA's frozen random bases (spec section 3.6).

Why our own generator: neither ``torch.Generator`` nor ``numpy.random`` promises the same stream
across releases, platforms or devices (spec 2.9), so a seed-only checkpoint would not be portable.
RSG-1 is integer-only and fully specified:

* key(seed, task, module, factor) = first 8 bytes (little endian) of
  SHA-256("rslora/v1|seed={seed}|task={task}|module={module}|factor={factor}")
* element c of P~ (C order over shape (k, rows, cols)) is SplitMix64's c-th output from state key:
  z = key + 0x9E3779B97F4A7C15 * (c + 1); z = (z ^ z>>30) * 0xBF58476D1CE4E5B9;
  z = (z ^ z>>27) * 0x94D049BB133111EB; z ^= z>>31          (all mod 2^64)
* P~ = (2 * (z >> 40) + 1 - 2^24) * 2^-24, an odd multiple of 2^-24 in (-1, 1), exact in float32.

Everything runs on numpy uint64 arrays (which wrap modulo 2^64), one (rows, cols) slab at a time, so
memory stays O(rows * cols) per module however large k is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np

GAMMA = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
_SHIFT30 = np.uint64(30)
_SHIFT27 = np.uint64(27)
_SHIFT31 = np.uint64(31)
_SHIFT40 = np.uint64(40)
_TWO24 = 1 << 24
_INV_TWO24 = np.float32(2.0**-24)
MAX_SEED = 1 << 63
# Counters are generated in chunks of this many values so that a huge slab does not need
# several uint64 temporaries of its full size at once (8 MiB per temporary).
_CHUNK = 1 << 20


def derive_key(seed: int, task_id: str, module: str, factor: str) -> int:
    """Per-(module, factor) SplitMix64 state, spec 3.6 step 1.

    Args:
        seed: projection seed, an integer in [0, 2**63).
        task_id: the checkpoint's task id (may be empty); different tasks get independent bases.
        module: module path as recorded in the checkpoint, or ``@shape:{d_out}x{d_in}``.
        factor: ``"A"`` or ``"B"``.

    Returns:
        The key as a Python int in [0, 2**64).
    """
    if not 0 <= int(seed) < MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if factor not in ("A", "B"):
        raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")
    text = f"rslora/v1|seed={int(seed)}|task={task_id}|module={module}|factor={factor}"
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def splitmix64_at(key: int, counters: np.ndarray | Iterable[int]) -> np.ndarray:
    """SplitMix64 outputs number ``counters`` (0-based) of the stream whose state starts at ``key``.

    Counter-based: output c depends only on (key, c), so any range can be generated independently.
    """
    c = np.asarray(counters, dtype=np.uint64)
    z = (c + np.uint64(1)) * GAMMA
    z += np.uint64(key)
    z ^= z >> _SHIFT30
    z *= MIX1
    z ^= z >> _SHIFT27
    z *= MIX2
    z ^= z >> _SHIFT31
    return z


def bits_to_float32(z: np.ndarray) -> np.ndarray:
    """Map raw outputs to odd multiples of 2^-24 in (-1, 1); exact in float32 (spec 3.6 step 3)."""
    m = (z >> _SHIFT40).astype(np.int64)
    numer = 2 * m + (1 - _TWO24)  # |numer| < 2^24, so the float32 conversion is exact
    out = numer.astype(np.float32)
    out *= _INV_TWO24  # a power-of-two scale: exact
    return out


def generate_range(key: int, start: int, count: int) -> np.ndarray:
    """Float32 values of elements ``start .. start+count-1`` of the stream for ``key``."""
    out = np.empty(count, dtype=np.float32)
    for lo in range(0, count, _CHUNK):
        hi = min(count, lo + _CHUNK)
        out[lo:hi] = bits_to_float32(
            splitmix64_at(key, np.arange(start + lo, start + hi, dtype=np.uint64))
        )
    return out


def generate_slab(key: int, index: int, rows: int, cols: int) -> np.ndarray:
    """Slab ``index`` (the l of P~[l]) of shape (rows, cols), float32."""
    size = rows * cols
    return generate_range(key, index * size, size).reshape(rows, cols)


def iter_slabs(key: int, k: int, rows: int, cols: int) -> Iterator[np.ndarray]:
    """Yield P~[0], ..., P~[k-1] one (rows, cols) slab at a time."""
    for index in range(k):
        yield generate_slab(key, index, rows, cols)


def generate(key: int, k: int, rows: int, cols: int) -> np.ndarray:
    """The whole basis P~ of shape (k, rows, cols) in one array (tests, stored-mode writers)."""
    return generate_range(key, 0, k * rows * cols).reshape(k, rows, cols)


def tensor_sha256(array: np.ndarray) -> str:
    """Per-tensor checksum of P~: SHA-256 of its C-contiguous little-endian float32 bytes."""
    return slabs_sha256([array])


def slabs_sha256(slabs: Iterable[np.ndarray]) -> str:
    """:func:`tensor_sha256` of the slabs' concatenation, without holding the whole tensor."""
    digest = hashlib.sha256()
    for slab in slabs:
        digest.update(_le_f32_bytes(slab))
    return digest.hexdigest()


def _le_f32_bytes(array: np.ndarray) -> bytes:
    """The bytes every P~ checksum is taken over: C-contiguous little-endian float32."""
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def combine(
    slabs: Iterable[np.ndarray], v: np.ndarray, *, digest: hashlib._Hash | None = None
) -> np.ndarray:
    """Contract a basis with its coefficients: X~ = sum_l v[l] * P~[l] (spec 3.2), in float64.

    Args:
        slabs: P~[0], P~[1], ... (float32, shape (rows, cols) each), e.g. from :func:`iter_slabs`.
        v: coefficient vector of length k.
        digest: optional hashlib object updated with every slab's bytes, so the checksum of the
            full tensor is available without holding it (its bytes are the slabs concatenated).

    Returns:
        float64 array (rows, cols). float64 accumulation keeps the sum independent of BLAS.
    """
    coeffs = np.asarray(v, dtype=np.float64)
    acc: np.ndarray | None = None
    count = 0
    for index, slab in enumerate(slabs):
        if digest is not None:
            digest.update(_le_f32_bytes(slab))
        term = slab.astype(np.float64)
        term *= coeffs[index]
        if acc is None:
            acc = term
        else:
            acc += term
        count += 1
    if acc is None or count != coeffs.shape[0]:
        raise ValueError(f"basis has {count} slabs but v has {coeffs.shape[0]} entries")
    return acc


def aggregate_sha256(checksums: dict[str, dict[str, str]]) -> str:
    r"""Aggregate digest of sorted lines ``f"{module}\t{factor}\t{hex}\n"`` (spec 3.6 step 4)."""
    lines = [
        f"{module}\t{factor}\t{checksums[module][factor]}\n"
        for module in sorted(checksums)
        for factor in sorted(checksums[module])
    ]
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()
