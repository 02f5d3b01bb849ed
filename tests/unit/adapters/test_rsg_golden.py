"""RSG-1 against the spec's known-answer values (TV0, TV3) and a pure-Python reference."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from rslora_deploy.adapters import rsg

GOLDEN = json.loads(
    (Path(__file__).resolve().parents[2] / "golden" / "rslora-golden-v1.json").read_text()
)
MASK = (1 << 64) - 1


def ref_splitmix(key: int, c: int) -> int:
    """Independent pure-Python SplitMix64 (big ints, explicit masks) from spec 3.6 step 2."""
    z = (key + 0x9E3779B97F4A7C15 * (c + 1)) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def ref_value(key: int, c: int) -> float:
    m = ref_splitmix(key, c) >> 40
    return (2 * m + 1 - (1 << 24)) / float(1 << 24)


pytestmark = pytest.mark.golden


def test_tv0_splitmix64_key0() -> None:
    got = [int(x) for x in rsg.splitmix64_at(0, [0, 1, 2])]
    assert got == [int(h, 16) for h in GOLDEN["TV0_splitmix64_key0_first3_hex"]]


def test_tv3_keys_and_raw_outputs() -> None:
    tv = GOLDEN["TV3"]
    key_a = rsg.derive_key(tv["seed"], tv["task_id"], tv["module"], "A")
    key_b = rsg.derive_key(tv["seed"], tv["task_id"], tv["module"], "B")
    assert hex(key_a) == tv["key_A"]
    assert hex(key_b) == tv["key_B"]
    raw = [int(x) for x in rsg.splitmix64_at(key_a, range(4))]
    assert raw == [int(h, 16) for h in tv["raw_u64_A_first4"]]


def test_tv3_basis_bit_exact_and_checksums() -> None:
    tv = GOLDEN["TV3"]
    key_a = rsg.derive_key(tv["seed"], tv["task_id"], tv["module"], "A")
    key_b = rsg.derive_key(tv["seed"], tv["task_id"], tv["module"], "B")
    p_a = rsg.generate(key_a, 2, 2, 4)
    p_b = rsg.generate(key_b, 2, 3, 2)
    assert p_a.dtype == np.float32
    np.testing.assert_array_equal(p_a * 2.0**24, np.array(GOLDEN["TV3_P_A_numerators"]))
    np.testing.assert_array_equal(p_b * 2.0**24, np.array(GOLDEN["TV3_P_B_numerators"]))
    assert rsg.tensor_sha256(p_a) == tv["sha256_P_A"]
    assert rsg.tensor_sha256(p_b) == tv["sha256_P_B"]
    other = rsg.generate(rsg.derive_key(tv["seed"], "other", tv["module"], "A"), 2, 2, 4)
    assert rsg.tensor_sha256(other) == tv["sha256_P_A_task_other"]


def test_numpy_matches_pure_python_reference_for_many_counters() -> None:
    key = rsg.derive_key(7, "t", "m.x", "B")
    counters = list(range(0, 300)) + [10**6 + 3, 2**40 + 11]
    got = rsg.splitmix64_at(key, counters)
    assert [int(x) for x in got] == [ref_splitmix(key, c) for c in counters]
    floats = rsg.bits_to_float32(got)
    assert floats.tolist() == [ref_value(key, c) for c in counters]


def test_key_derivation_matches_hashlib_reference() -> None:
    text = "rslora/v1|seed=0|task=|module=@shape:3x4|factor=A"
    expected = struct.unpack("<Q", hashlib.sha256(text.encode()).digest()[:8])[0]
    assert rsg.derive_key(0, "", "@shape:3x4", "A") == expected


def test_all_numerators_odd_and_in_range() -> None:
    values = rsg.generate(rsg.derive_key(1, "", "m", "A"), 3, 17, 19).astype(np.float64) * 2**24
    assert np.all(np.abs(values) % 2 == 1)
    assert np.abs(values).max() < 2**24


def test_slab_wise_equals_one_shot_and_combine_hash() -> None:
    key = rsg.derive_key(3, "x", "a.b", "A")
    whole = rsg.generate(key, 4, 5, 6)
    slabs = list(rsg.iter_slabs(key, 4, 5, 6))
    np.testing.assert_array_equal(np.stack(slabs), whole)
    digest = hashlib.sha256()
    v = np.array([0.5, -1.0, 2.0, 0.25])
    got = rsg.combine(iter(slabs), v, digest=digest)
    assert digest.hexdigest() == rsg.tensor_sha256(whole)
    np.testing.assert_array_equal(got, np.einsum("l,lij->ij", v, whole.astype(np.float64)))


def test_chunked_generation_crosses_chunk_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    key = rsg.derive_key(5, "", "m", "B")
    whole = rsg.generate_range(key, 0, 1000)
    monkeypatch.setattr(rsg, "_CHUNK", 7)
    np.testing.assert_array_equal(rsg.generate_range(key, 0, 1000), whole)


def test_aggregate_sha256_reference() -> None:
    sums = {"b": {"B": "22", "A": "11"}, "a": {"A": "33", "B": "44"}}
    text = "a\tA\t33\na\tB\t44\nb\tA\t11\nb\tB\t22\n"
    assert rsg.aggregate_sha256(sums) == hashlib.sha256(text.encode()).hexdigest()


def test_bad_seed_and_factor_rejected() -> None:
    with pytest.raises(ValueError, match="seed"):
        rsg.derive_key(-1, "", "m", "A")
    with pytest.raises(ValueError, match="factor"):
        rsg.derive_key(0, "", "m", "C")
