"""Round-to-nearest reference: error bounds, packed shapes, bit-exact pack/unpack."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rslora_deploy.quantizers import rtn_math as rtn
from tests import tolerances as tol


def _weight(out_f: int, in_f: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((out_f, in_f)) * rng.uniform(0.01, 2.0)).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([4, 8]),
    sym=st.booleans(),
    groups=st.integers(1, 4),
    group=st.sampled_from([16, 32, 64]),
    out_words=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_bit_exact(bits, sym, groups, group, out_words, seed):
    out_f = out_words * 32 // bits * 2
    w = _weight(out_f, groups * group, seed)
    gq = rtn.quantize_rtn(w, bits, group, sym)
    packed = rtn.pack_gptq(gq)
    pack = 32 // bits
    assert packed.qweight.shape == (groups * group // pack, out_f)
    assert packed.qzeros.shape == (groups, out_f // pack)
    assert packed.scales.shape == (groups, out_f)
    assert packed.g_idx.shape == (groups * group,)
    assert packed.qweight.dtype == np.int32
    assert packed.qzeros.dtype == np.int32
    assert packed.scales.dtype == np.float16
    for arr in (packed.qweight, packed.qzeros, packed.scales):
        assert arr.flags["C_CONTIGUOUS"]  # safetensors ignores strides
    back = rtn.unpack_gptq(packed, bits)
    assert np.array_equal(back.q, gq.q)
    assert np.array_equal(back.zeros, gq.zeros)
    assert np.array_equal(back.scales, gq.scales)
    assert np.array_equal(rtn.dequantize_gptq(packed, bits), rtn.dequantize(gq))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_dequant_error_bound(bits, sym):
    w = _weight(32, 256, 1)
    gq = rtn.quantize_rtn(w, bits, 64, sym)
    err = np.abs(rtn.dequantize(gq) - w).reshape(32, 4, 64)
    step = gq.scales.astype(np.float32)[..., None]
    # Half a step from rounding; symmetric grids clip the largest positive value by up to one
    # step (the grid is [-2^(b-1), 2^(b-1)-1]); asymmetric zero clamping (z >= 1) too.
    assert (err <= step * 1.0 + tol.FP32_ATOL).all()
    assert np.median(err / step) < 0.3
    if bits == 8:
        assert np.linalg.norm(rtn.dequantize(gq) - w) / np.linalg.norm(w) < tol.RTN8_RELATIVE_ERROR


def test_codes_in_range_and_sym_zero():
    gq = rtn.quantize_rtn(_weight(16, 64, 2), 4, 32, True)
    assert gq.q.min() >= 0
    assert gq.q.max() <= 15
    assert (gq.zeros == 8).all()


def test_known_values():
    # One row, one group of 16: symmetric, absmax 7.5 -> scale 1.0, zero 8.
    row = [7.5, -7.5, 0.0, 1.0, -1.0, 2.4, 2.6, 3] + [0] * 8
    w = np.array([row] * 8, dtype=np.float32)
    gq = rtn.quantize_rtn(w, 4, 16, True)
    assert gq.scales[0, 0] == np.float16(1.0)
    assert gq.q[0, :8].tolist() == [15, 0, 8, 9, 7, 10, 11, 11]
    packed = rtn.pack_gptq(gq)
    # Column 0 of qweight packs q[0..7, 0] low nibble first: 15,0,8,9,7,10,11,11.
    assert packed.qweight.view(np.uint32)[0, 0] == 0xBBA7980F
    # Eight zero points of 8, stored minus one (v1 format): 0x77777777.
    assert packed.qzeros.view(np.uint32)[0, 0] == 0x77777777


def test_all_zero_group_and_bad_args():
    gq = rtn.quantize_rtn(np.zeros((8, 32), np.float32), 4, 32, False)
    assert np.all(rtn.dequantize(gq) == 0)
    with pytest.raises(ValueError, match="bits"):
        rtn.quantize_rtn(np.zeros((8, 32), np.float32), 3, 32, True)
    with pytest.raises(ValueError, match="divisible"):
        rtn.quantize_rtn(np.zeros((8, 48), np.float32), 4, 32, True)
