"""Pure numpy functions: per-group round-to-nearest quantization and GPTQ (v1) int32 packing.

No model, file or device knowledge lives here; :mod:`rslora_deploy.quantizers.rtn` does the
orchestration. The grid is the one the GPTQ reference quantizer uses (Frantar et al., "GPTQ",
arXiv 2210.17323, ``Quantizer.find_params``), so that RTN differs from GPTQ only by GPTQ's
error-compensating column updates, not by a different grid:

* asymmetric: ``xmin = min(w, 0)``, ``xmax = max(w, 0)``, ``s = (xmax - xmin) / maxq``,
  ``z = round(-xmin / s)``;
* symmetric: ``a = max|w|``, ``s = 2a / maxq``, ``z = (maxq + 1) / 2``;
* ``q = clamp(round(w / s) + z, 0, maxq)`` and ``dequant(q) = s * (q - z)``,

with ``maxq = 2**bits - 1`` and one ``(s, z)`` pair per output row and group of ``group_size``
consecutive input columns.

GPTQ "v1" checkpoint layout (what AutoGPTQ wrote and gptqmodel writes with ``format: gptq``), for a
linear layer with weight ``W`` of shape ``[out, in]`` and ``pack = 32 // bits`` values per int32:

* ``qweight`` int32 ``[in // pack, out]``: ``qweight[r, c]`` holds ``q[r*pack + k, c]`` in bits
  ``bits*k ... bits*k + bits - 1`` (``q`` is laid out ``[in, out]``, i.e. ``W`` transposed);
* ``qzeros`` int32 ``[groups, out // pack]``: the zero points minus one, packed along ``out``
  (the v1 format stores ``z - 1``; loaders add the one back);
* ``scales`` float16 ``[groups, out]``;
* ``g_idx`` int32 ``[in]``: the group of every input column, ``i // group_size`` without act-order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class GroupQuant:
    """Quantized integers of one weight matrix with their per-group parameters.

    Attributes:
        q: integer codes, ``uint8`` ``[out, in]``.
        scales: float16 ``[out, groups]`` (the stored precision; codes were computed with it).
        zeros: integer zero points ``[out, groups]``, in ``[1, maxq]``.
        bits: bits per code.
        group_size: input columns per group.
    """

    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    bits: int
    group_size: int


@dataclass(frozen=True)
class PackedGPTQ:
    """The four tensors of one GPTQ v1 linear layer (see the module docstring for layouts)."""

    qweight: np.ndarray
    qzeros: np.ndarray
    scales: np.ndarray
    g_idx: np.ndarray


def _check(weight: np.ndarray, bits: int, group_size: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {weight.shape}")
    in_features = weight.shape[1]
    group = in_features if group_size == -1 else group_size
    if in_features % group:
        raise ValueError(f"in_features={in_features} is not divisible by group_size={group}")
    return group


def quantize_rtn(weight: np.ndarray, bits: int, group_size: int, sym: bool) -> GroupQuant:
    """Round-to-nearest quantization of ``weight`` (``[out, in]``) with one scale per group.

    The scale is rounded to float16 *before* the codes are computed, so ``dequantize`` of the
    stored tensors is exactly the value the codes were chosen for.

    Args:
        weight: float matrix ``[out, in]``.
        bits: 4 or 8.
        group_size: input columns per group, or -1 for one group per row.
        sym: symmetric grid (fixed zero point ``2**(bits-1)``).

    Returns:
        The codes and their group parameters.
    """
    group = _check(weight, bits, group_size)
    maxq = 2**bits - 1
    out_f, in_f = weight.shape
    w = weight.astype(np.float32).reshape(out_f, in_f // group, group)
    if sym:
        xmax = np.abs(w).max(axis=2)
        xmin = -xmax
    else:
        xmin = np.minimum(w.min(axis=2), 0.0)
        xmax = np.maximum(w.max(axis=2), 0.0)
    # An all-zero group would give a zero scale; GPTQ's reference sets its range to [-1, 1].
    empty = (xmin == 0) & (xmax == 0)
    xmin = np.where(empty, -1.0, xmin)
    xmax = np.where(empty, 1.0, xmax)
    scales = ((xmax - xmin) / maxq).astype(np.float16)
    s32 = scales.astype(np.float32)
    if sym:
        zeros = np.full(scales.shape, (maxq + 1) // 2, dtype=np.int64)
    else:
        # The v1 layout stores z - 1, so z = 0 cannot be represented: clamp to 1 (the grid then
        # moves down one step for groups whose minimum is within half a step of zero).
        zeros = np.clip(np.round(-xmin / s32), 1, maxq).astype(np.int64)
    q = np.clip(np.round(w / s32[..., None]) + zeros[..., None], 0, maxq)
    return GroupQuant(q.reshape(out_f, in_f).astype(np.uint8), scales, zeros, bits, group)


def dequantize(gq: GroupQuant) -> np.ndarray:
    """Float32 weight ``[out, in]`` that the codes represent: ``s * (q - z)`` per group."""
    out_f, in_f = gq.q.shape
    q = gq.q.astype(np.float32).reshape(out_f, in_f // gq.group_size, gq.group_size)
    s = gq.scales.astype(np.float32)[..., None]
    z = gq.zeros.astype(np.float32)[..., None]
    return (s * (q - z)).reshape(out_f, in_f)


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``[n, m]`` small unsigned ints along axis 0 into int32 ``[n * bits // 32, m]``."""
    pack = 32 // bits
    n, m = values.shape
    if n % pack:
        raise ValueError(f"cannot pack {n} rows into int32 words of {pack} values")
    v = values.astype(np.uint32).reshape(n // pack, pack, m)
    shifts = (np.arange(pack, dtype=np.uint32) * bits)[None, :, None]
    packed = np.bitwise_or.reduce(v << shifts, axis=1)
    return packed.astype(np.uint32).view(np.int32)


def _unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`_pack_rows`: int32 ``[n, m]`` -> uint8 ``[n * 32 // bits, m]``."""
    pack = 32 // bits
    mask = np.uint32(2**bits - 1)
    p = packed.view(np.uint32)[:, None, :]
    shifts = (np.arange(pack, dtype=np.uint32) * bits)[None, :, None]
    vals = (p >> shifts) & mask
    return vals.reshape(packed.shape[0] * pack, packed.shape[1]).astype(np.uint8)


def pack_gptq(gq: GroupQuant) -> PackedGPTQ:
    """Pack codes into the GPTQ v1 tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``)."""
    in_f = gq.q.shape[1]
    qweight = _pack_rows(gq.q.T, gq.bits)
    # qzeros packs along the output dimension: zeros are [out, groups], so pack rows, transpose.
    qzeros = _pack_rows(gq.zeros - 1, gq.bits).T.copy()
    g_idx = (np.arange(in_f) // gq.group_size).astype(np.int32)
    # C order matters: safetensors writes the raw buffer and ignores numpy strides.
    return PackedGPTQ(
        np.ascontiguousarray(qweight),
        np.ascontiguousarray(qzeros),
        np.ascontiguousarray(gq.scales.T),
        g_idx,
    )


def unpack_gptq(packed: PackedGPTQ, bits: int) -> GroupQuant:
    """Read GPTQ v1 tensors back into codes and group parameters (no act-order permutation).

    Raises:
        ValueError: ``g_idx`` is not the plain ``i // group_size`` sequence (act-order checkpoint).
    """
    q = _unpack_rows(packed.qweight, bits).T
    zeros = _unpack_rows(packed.qzeros.T.copy(), bits).T.astype(np.int64) + 1
    groups = packed.scales.shape[0]
    in_f = q.shape[1]
    group = in_f // groups
    if not np.array_equal(packed.g_idx, np.arange(in_f) // group):
        raise ValueError("g_idx is permuted (act-order); use dequantize_gptq")
    return GroupQuant(q.copy(), packed.scales.T.copy(), zeros.T.copy(), bits, group)


def dequantize_gptq(packed: PackedGPTQ, bits: int) -> np.ndarray:
    """Float32 weight ``[out, in]`` of a GPTQ v1 layer, honouring any ``g_idx`` order."""
    q = _unpack_rows(packed.qweight, bits).astype(np.float32)  # [in, out]
    zeros = _unpack_rows(packed.qzeros.T.copy(), bits).T.astype(np.float32) + 1  # [groups, out]
    scales = packed.scales.astype(np.float32)
    g = packed.g_idx.astype(np.int64)
    return (scales[g] * (q - zeros[g])).T.copy()
