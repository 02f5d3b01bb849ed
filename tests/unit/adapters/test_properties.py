"""Spec section 8 properties (hypothesis) and our own vectors for the variants the golden file
does not cover (global v, grouped v, tied v, per-shape sharing, normalization none, alpha/sqrt r),
checked against an independent pure-Python RS-LoRA reference written from the spec."""

from __future__ import annotations

import hashlib
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from rslora_deploy.adapters import rsg
from rslora_deploy.adapters.convert import to_peft_lora
from rslora_deploy.adapters.delta import ModuleDelta
from rslora_deploy.adapters.detect import load_adapter
from rslora_deploy.adapters.layers import apply_on_the_fly
from rslora_deploy.adapters.merge_math import merge_deltas
from rslora_deploy.adapters.rslora_writer import RsloraSpec, write_checkpoint
from rslora_deploy.testing.adapters import fake_base_model
from tests import tolerances as tol

MASK = (1 << 64) - 1
SETTINGS = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# ---- independent reference (pure Python ints/floats, spec 3.2 and 3.6) ---------------------


def ref_key(seed: int, task: str, module: str, factor: str) -> int:
    text = f"rslora/v1|seed={seed}|task={task}|module={module}|factor={factor}"
    return struct.unpack("<Q", hashlib.sha256(text.encode()).digest()[:8])[0]


def ref_basis(key: int, k: int, rows: int, cols: int) -> list[list[list[float]]]:
    out, c = [], 0
    for _ in range(k):
        slab = []
        for _ in range(rows):
            row = []
            for _ in range(cols):
                z = (key + 0x9E3779B97F4A7C15 * (c + 1)) & MASK
                z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
                z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
                z ^= z >> 31
                row.append((2 * (z >> 40) + 1 - (1 << 24)) / 2.0**24)
                c += 1
            slab.append(row)
        out.append(slab)
    return out


def ref_dw(
    seed: int,
    task: str,
    pkey: str,
    d_out: int,
    d_in: int,
    r: int,
    k: int,
    v_a: list[float],
    v_b: list[float],
    s: float,
) -> np.ndarray:
    p_a = ref_basis(ref_key(seed, task, pkey, "A"), k, r, d_in)
    p_b = ref_basis(ref_key(seed, task, pkey, "B"), k, d_out, r)
    a = [[sum(v_a[t] * p_a[t][i][j] for t in range(k)) for j in range(d_in)] for i in range(r)]
    b = [[sum(v_b[t] * p_b[t][i][j] for t in range(k)) for j in range(r)] for i in range(d_out)]
    return np.array(
        [[s * sum(b[i][q] * a[q][j] for q in range(r)) for j in range(d_in)] for i in range(d_out)]
    )


# ---- our own vectors for the variants ----------------------------------------------------

M1, M2, M3 = "blk.0.q", "blk.0.v", "blk.1.q"
MODS = {
    M1: {"d_in": 5, "d_out": 4, "layout": "linear"},
    M2: {"d_in": 5, "d_out": 3, "layout": "linear"},
    M3: {"d_in": 5, "d_out": 4, "layout": "linear"},
}
VA, VB, VC = [0.5, -1.25, 2.0], [1.0, 0.25, -0.75], [-2.0, 0.5, 1.5]


@pytest.mark.parametrize("variant", ["global", "grouped", "tied", "per_shape", "none_sqrt_r"])
def test_variant_vectors_against_reference(tmp_path: Path, variant: str) -> None:
    kwargs: dict[str, Any] = {}
    alpha, rule, norm = 2.0, "alpha_over_r", "inv_sqrt_k"
    if variant == "global":
        v = {"rslora_v_A": VA, "rslora_v_B": VB}
        per = dict.fromkeys(MODS, (VA, VB))
        kwargs["v_sharing"] = "global"
    elif variant == "grouped":
        v = {
            "rslora_group.q.v_A": VA,
            "rslora_group.q.v_B": VB,
            "rslora_group.v.v_A": VC,
            "rslora_group.v.v_B": VA,
        }
        per = {M1: (VA, VB), M3: (VA, VB), M2: (VC, VA)}
        kwargs.update(v_sharing="grouped", v_groups={"q": [M1, M3], "v": [M2]})
    elif variant == "tied":
        v = {f"{m}.rslora_v": vec for m, vec in zip(MODS, (VA, VB, VC), strict=True)}
        per = {m: (vec, vec) for m, vec in zip(MODS, (VA, VB, VC), strict=True)}
        kwargs["v_ab_tied"] = True
    elif variant == "per_shape":
        v = {f"{m}.rslora_v_{f}": vec for m in MODS for f, vec in (("A", VA), ("B", VC))}
        per = dict.fromkeys(MODS, (VA, VC))
        kwargs["sharing"] = "per_shape"
    else:
        v = {f"{m}.rslora_v_{f}": vec for m in MODS for f, vec in (("A", VB), ("B", VA))}
        per = dict.fromkeys(MODS, (VB, VA))
        rule, norm = "alpha_over_sqrt_r", "none"
    r, k, seed, task = 2, 3, 99, "variant"
    s = (alpha / (r if rule == "alpha_over_r" else math.sqrt(r))) / (
        k if norm == "inv_sqrt_k" else 1
    )
    spec = RsloraSpec(
        modules=MODS,
        r=r,
        k=k,
        alpha=alpha,
        scaling_rule=rule,
        normalization=norm,
        seed=seed,
        task_id=task,
        base_model=fake_base_model(),
        **kwargs,
    )
    ckpt = write_checkpoint(tmp_path, spec, {n: np.asarray(x, np.float32) for n, x in v.items()})
    adapter = load_adapter(ckpt)
    assert adapter.meta["trainable_parameters"] == len(v) * k
    for delta in adapter.deltas:
        m = MODS[delta.name]
        pkey = f"@shape:{m['d_out']}x{m['d_in']}" if variant == "per_shape" else delta.name
        want = ref_dw(seed, task, pkey, m["d_out"], m["d_in"], r, k, *per[delta.name], s)
        np.testing.assert_allclose(delta.delta_weight(), want, rtol=tol.F64_RTOL, atol=tol.F64_ATOL)
    if variant == "per_shape":  # same shape and v => identical dW (spec 3.4 warning case)
        by = {d.name: d.delta_weight() for d in adapter.deltas}
        np.testing.assert_array_equal(by[M1], by[M3])


# ---- merged == on-the-fly for every layout ------------------------------------------------


def _layer(layout: str, d_out: int, d_in: int, full_out: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if layout == "linear":
        return nn.Linear(d_in, full_out)
    if layout == "conv1d":
        layer = Conv1D(full_out, d_in)
        nn.init.normal_(layer.weight, std=0.3)
        nn.init.normal_(layer.bias, std=0.3)
        return layer
    return nn.Embedding(d_in, full_out)


@SETTINGS
@given(
    layout=st.sampled_from(["linear", "conv1d", "embedding"]),
    d_in=st.integers(1, 9),
    d_out=st.integers(1, 9),
    extra=st.integers(0, 4),
    r=st.integers(1, 4),
    k=st.integers(1, 5),
    seed=st.integers(0, 2**63 - 1),
    task=st.text(max_size=4),
    data=st.data(),
)
def test_merged_equals_on_the_fly(
    tmp_path: Path,
    layout: str,
    d_in: int,
    d_out: int,
    extra: int,
    r: int,
    k: int,
    seed: int,
    task: str,
    data: st.DataObject,
) -> None:
    floats = st.floats(-2, 2, allow_nan=False, width=32)
    v_a = data.draw(st.lists(floats, min_size=k, max_size=k))
    v_b = data.draw(st.lists(floats, min_size=k, max_size=k))
    start = data.draw(st.integers(0, extra))
    entry: dict[str, Any] = {"d_in": d_in, "d_out": d_out, "layout": layout}
    if extra:
        entry["out_slice"] = [start, start + d_out]
    spec = RsloraSpec(
        modules={"m": entry},
        r=r,
        k=k,
        seed=seed,
        task_id=task,
        base_model=fake_base_model(),
        alpha=3.0,
    )
    ckpt = write_checkpoint(
        tmp_path / f"c{seed}",
        spec,
        {"m.rslora_v_A": np.float32(v_a), "m.rslora_v_B": np.float32(v_b)},
    )
    layer = _layer(layout, d_out, d_in, d_out + extra, seed % 1000)
    before = layer.weight.detach().clone()
    merged = nn.ModuleDict({"m": layer})
    fly = apply_on_the_fly(
        nn.ModuleDict({"m": _layer(layout, d_out, d_in, d_out + extra, seed % 1000)}),
        load_adapter(ckpt).deltas,
    )
    merge_deltas(merged, load_adapter(ckpt).deltas)
    x = torch.randint(0, d_in, (3, 2)) if layout == "embedding" else torch.randn(3, d_in)
    with torch.no_grad():
        y_fly, y_merged = fly["m"](x), merged["m"](x)
    bound = tol.FP32_LOGITS_RTOL * (1 + y_fly.abs().max().item())
    assert (y_fly - y_merged).abs().max().item() <= bound
    if extra:  # out_slice: everything outside the slice stays bit-identical
        w, w0 = layer.weight.detach(), before
        outside = torch.ones(d_out + extra, dtype=torch.bool)
        outside[start : start + d_out] = False
        if layout == "linear":
            assert torch.equal(w[outside], w0[outside])
        else:
            assert torch.equal(w[:, outside], w0[:, outside])


# ---- algebra, determinism, storage equivalence ---------------------------------------------


def _ckpt(tmp: Path, name: str, v_a: Any, v_b: Any, **kw: Any) -> Path:
    mods = kw.pop("modules", {"m": {"d_in": 6, "d_out": 5, "layout": "linear"}})
    spec = RsloraSpec(
        modules=mods,
        r=3,
        k=4,
        seed=kw.pop("seed", 5),
        task_id="p",
        base_model=fake_base_model(),
        **kw,
    )
    v = {}
    for m in mods:
        v[f"{m}.rslora_v_A"], v[f"{m}.rslora_v_B"] = np.float32(v_a), np.float32(v_b)
    return write_checkpoint(tmp / name, spec, v)


def _dw(path: Path, name: str = "m") -> np.ndarray:
    return {d.name: d for d in load_adapter(path).deltas}[name].delta_weight()


vecs = st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=4, max_size=4)


@SETTINGS
@given(v_a=vecs, v_b=vecs, c=st.sampled_from([0.5, 2.0, -4.0, 0.25]))
def test_algebra(tmp_path: Path, v_a: list[float], v_b: list[float], c: float) -> None:
    base = _dw(_ckpt(tmp_path, "b", v_a, v_b))
    assert not np.any(_dw(_ckpt(tmp_path, "z", v_a, [0.0] * 4)))  # v_B = 0 => dW = 0
    # (c v_A, v_B / c): c is a power of two, so the scaled v are exact in float32
    np.testing.assert_allclose(
        _dw(_ckpt(tmp_path, "c", [c * x for x in v_a], [x / c for x in v_b])),
        base,
        rtol=tol.F64_IDENTITY,
        atol=tol.F64_IDENTITY_ATOL,
    )
    np.testing.assert_allclose(
        _dw(_ckpt(tmp_path, "a", v_a, v_b, alpha=3.0)),
        3 * base,
        rtol=tol.F64_RTOL,
        atol=tol.F64_ATOL,
    )  # linear in alpha
    assert np.linalg.matrix_rank(base, tol=1e-9) <= 3  # rank <= r


@SETTINGS
@given(v_a=vecs, v_b=vecs)
def test_stored_equals_seed_bit_for_bit_and_export_roundtrip(
    tmp_path: Path, v_a: list[float], v_b: list[float]
) -> None:
    seed_ckpt = _ckpt(tmp_path, "s", v_a, v_b)
    stored_ckpt = _ckpt(tmp_path, "t", v_a, v_b, storage="stored")
    np.testing.assert_array_equal(_dw(seed_ckpt), _dw(stored_ckpt))
    out = tmp_path / "peft"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    to_peft_lora(seed_ckpt, out)
    np.testing.assert_allclose(
        _dw(out), _dw(seed_ckpt), rtol=tol.FP32_EXPORT_RTOL, atol=tol.FP32_STORAGE_ATOL
    )


def test_determinism_order_and_other_modules(tmp_path: Path) -> None:
    mods = {
        "a.q": {"d_in": 6, "d_out": 5, "layout": "linear"},
        "a.k": {"d_in": 6, "d_out": 2, "layout": "linear"},
    }
    one = _ckpt(tmp_path, "one", [1, 2, 3, 4], [1, -1, 1, -1], modules=mods)
    rev = _ckpt(tmp_path, "rev", [1, 2, 3, 4], [1, -1, 1, -1], modules=dict(reversed(mods.items())))
    alone = _ckpt(
        tmp_path,
        "alone",
        [1, 2, 3, 4],
        [1, -1, 1, -1],
        modules={"a.q": mods["a.q"], "b.big": {"d_in": 60, "d_out": 50, "layout": "linear"}},
    )
    np.testing.assert_array_equal(_dw(one, "a.q"), _dw(rev, "a.q"))
    np.testing.assert_array_equal(_dw(one, "a.q"), _dw(alone, "a.q"))
    np.testing.assert_array_equal(_dw(one, "a.q"), _dw(one, "a.q"))


def test_unmerge_recovers_weight_and_conv1d_is_transpose() -> None:
    rng = np.random.default_rng(3)
    delta = ModuleDelta(
        "m", None, 7, 5, B=rng.normal(size=(5, 2)), A=rng.normal(size=(2, 7)), scale=0.3
    )
    lin, conv = nn.Linear(7, 5), Conv1D(5, 7)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.T)
    w0 = lin.weight.detach().clone()
    merge_deltas(nn.ModuleDict({"m": lin}), [delta])
    merge_deltas(nn.ModuleDict({"m": conv}), [delta])
    assert torch.equal(conv.weight, lin.weight.T)
    unmerged = lin.weight.detach() - torch.from_numpy(delta.delta_weight(np.float32))
    torch.testing.assert_close(unmerged, w0, rtol=0, atol=tol.FP32_ATOL)


def test_bf16_base_within_dtype_tolerance() -> None:
    rng = np.random.default_rng(4)
    delta = ModuleDelta(
        "m", None, 16, 8, B=rng.normal(size=(8, 2)), A=rng.normal(size=(2, 16)), scale=0.01
    )
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    ref = nn.Linear(16, 8)
    with torch.no_grad():
        ref.weight.copy_(lin.weight.float())
        ref.bias.copy_(lin.bias.float())
    merge_deltas(nn.ModuleDict({"m": lin}), [delta])
    merge_deltas(nn.ModuleDict({"m": ref}), [delta])
    x = torch.randn(4, 16)
    with torch.no_grad():
        y = lin(x.to(torch.bfloat16)).float()
        y_ref = nn.functional.linear(x.to(torch.bfloat16).float(), ref.weight, lin.bias.float())
    bound = 2 * 2.0**-8 * (x.abs() @ ref.weight.abs().T).max().item() * 2
    assert (y - y_ref).abs().max().item() <= bound


def test_rsg_throughput_is_vectorized() -> None:
    # A guard, not a benchmark: a per-element Python loop would take minutes for 4M values.
    key = rsg.derive_key(0, "", "m", "A")
    import time

    start = time.perf_counter()
    rsg.generate_range(key, 0, 4_000_000)
    assert time.perf_counter() - start < 10
