"""Merge ModuleDeltas into a loaded torch model (spec sections 5.2-5.4).

Per weight W (stored layout) and its deltas dW_i (logical d_out x d_in, computed in fp64 and rounded
once to fp32):

    W32 = fp32(W);   linear: W32[slice] += dW;   conv1d/embedding: W32[:, slice] += dW^T
    W'  = round_to(target_dtype, W32)           # ONE rounding (spec 5.4, golden TV7)

A DoRA delta (Liu et al. 2024, arXiv 2402.09353) then re-normalises its output rows with its trained
magnitude m, in the logical orientation (so conv1d and embedding columns of the stored weight):

    n_i = ||W32[i, :] + dW[i, :]||_2;   W32[i, :] = (m_i / n_i) * (W32[i, :] + dW[i, :])

before the one rounding, exactly PEFT's merge (the norm over the unmerged base plus this delta).

PEFT's safe_merge casts dW to the base dtype before adding, which rounds twice: for W = 1 and
dW = 2^-8 + 2^-20 in bf16 it gives 1.0 where a single rounding gives 1.0078125. Several deltas on
the same weight are summed in fp32 and still rounded once. Biases are never touched.

Each merged weight gets fidelity statistics because a small dW can vanish when rounded to bf16
and later to 4 bits: max|dW|, ||dW||_F/||W||_F, the share of entries with dW != 0 whose stored
value did not change ("lost"), and the relative merge error ||(W' - W) - dW||_F / ||dW||_F.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rslora_deploy.adapters.delta import ModuleDelta, TensorOverride
from rslora_deploy.errors import (
    AdapterFormatError,
    BaseMismatchError,
    MergeError,
    NonFiniteError,
    ShapeMismatchError,
    UnsupportedError,
)

logger = logging.getLogger(__name__)

# Class names of packed/quantized linear layers from GPTQ/AWQ/bitsandbytes/HQQ/torchao backends:
# matching by name avoids importing any of those backends just to refuse them.
_QUANTIZED_NAMES = (
    "QuantLinear",
    "Linear4bit",
    "Linear8bitLt",
    "WQLinear",
    "HQQLinear",
    "QLinear",
    "GPTQ",
    "AWQ",
    "Marlin",
    "ExllamaV2",
    "TorchaoLinear",
)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class ModuleStats:
    """Fidelity of one merged weight (one row of merge_report.json)."""

    module: str
    layout: str
    deltas: int
    out_slices: list[list[int] | None]
    base_dtype: str
    out_dtype: str
    max_abs_delta: float
    delta_to_weight_norm: float
    lost_fraction: float
    relative_merge_error: float
    magnitude_factor: list[float] | None = None
    """DoRA only: [min, max] of m / ||W + dW||_row, the factor each output row was scaled by."""


def layer_layout(module: nn.Module, name: str) -> str:
    """``linear``, ``conv1d`` or ``embedding`` for a supported layer (spec 5.2 step 2).

    Raises:
        UnsupportedError: E060 for an already-quantized layer, E021 for other types.
    """
    cls_name = type(module).__name__
    weight = getattr(module, "weight", None)
    weight_cls = type(weight).__name__ if weight is not None else ""
    if (
        any(q in cls_name for q in _QUANTIZED_NAMES)
        or hasattr(module, "qweight")
        or weight_cls in ("Params4bit", "Int8Params")
        or (isinstance(weight, torch.Tensor) and weight.dtype not in _FLOAT_DTYPES)
    ):
        dtype = getattr(weight, "dtype", None) if weight is not None else None
        raise UnsupportedError(
            f"{name} is already quantized ({cls_name}, weight dtype {dtype}); merge into the "
            "fp32/fp16/bf16 base first, then quantize",
            code="E060",
        )
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if cls_name == "Conv1D" and weight is not None and weight.ndim == 2:
        return "conv1d"
    raise UnsupportedError(
        f"{name} is a {cls_name}; supported targets are nn.Linear, "
        "transformers Conv1D and nn.Embedding",
        code="E021",
    )


def weight_of(module: nn.Module) -> torch.Tensor:
    """The layer's ``weight`` tensor.

    ``nn.Module.__getattr__`` is typed ``Tensor | Module``; every layer that reaches the merge has
    passed :func:`layer_layout`, so its weight is a tensor (an nn.Parameter).
    """
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"{type(module).__name__}.weight is a {type(weight).__name__}, not a tensor"
        )
    return weight


def _untie_config(model: nn.Module) -> None:
    """Record in the model's config (when it has one) that input and output embeddings differ."""
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False


def logical_shape(module: nn.Module, layout: str) -> tuple[int, int]:
    """(d_out, d_in) of the layer in the nn.Linear convention."""
    rows, cols = weight_of(module).shape
    return (rows, cols) if layout == "linear" else (cols, rows)


def resolve_module(model: nn.Module, name: str, recorded: str | None = None) -> nn.Module:
    """The submodule at ``name`` (spec 5.2 step 1; E020 if absent).

    ``recorded`` is the adapter's own name when a user rename map turned it into ``name``; the
    error then names both, so a wrong map is easy to spot.
    """
    try:
        return model.get_submodule(name)
    except AttributeError:
        if recorded and recorded != name:
            raise AdapterFormatError(
                f"module {name} (renamed from {recorded} by adapter.rename) does not exist in "
                f"the base model ({type(model).__name__}); fix the --rename map",
                code="E020",
            ) from None
        fused = fused_layout_hint(model, name)
        if fused:
            raise AdapterFormatError(
                f"module {name} listed in the adapter does not exist in the base model "
                f"({type(model).__name__}): {fused}",
                code="E020",
            ) from None
        raise AdapterFormatError(
            f"module {name} listed in the adapter does not exist in the base model "
            f"({type(model).__name__}); the adapter was made for another architecture, or its "
            "names need --rename OLD=NEW",
            code="E020",
        ) from None


#: Projections some architectures store as one fused ``nn.Linear`` (Phi-3: ``qkv_proj`` and
#: ``gate_up_proj``; GLM-4: ``gate_up_proj``) and others as separate ones (Llama, Qwen, Mistral).
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def fused_layout_hint(model: nn.Module, name: str) -> str | None:
    """Why ``name`` is absent when the base fuses (or splits) that projection, else None.

    An adapter trained on a split model (``q_proj``) cannot be merged into a fused one
    (``qkv_proj``) or the reverse: the update of one part is not an update of the whole, and
    guessing the row split would be wrong for any other layout. The hint names what the base has.
    """
    parent_name, _, leaf = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        return None
    children = {child for child, _ in parent.named_children()}
    for fused, parts in FUSED_PROJECTIONS.items():
        if leaf in parts and fused in children:
            return (
                f"this architecture fuses {', '.join(parts)} into one {fused} module, so the "
                f"adapter must target {parent_name}.{fused} (an adapter for the split "
                f"{leaf} cannot be merged into it)"
            )
        if leaf == fused and set(parts) <= children:
            return (
                f"this architecture has separate {', '.join(parts)} modules, not a fused "
                f"{fused}, so the adapter must target {parent_name}.{{{','.join(parts)}}} "
                f"(an adapter for the fused {fused} cannot be split into them)"
            )
    return None


def _is_tied(model: nn.Module, module: nn.Module) -> bool:
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb_in = get_in() if callable(get_in) else None
    emb_out = get_out() if callable(get_out) else None
    if module is not emb_in and module is not emb_out:
        return False
    if emb_in is None or emb_out is None:
        return False
    shared = emb_in.weight.data_ptr() == emb_out.weight.data_ptr()
    cfg = getattr(model, "config", None)
    return shared or bool(getattr(cfg, "tie_word_embeddings", False))


def check_delta_against_layer(delta: ModuleDelta, layout: str, d_out: int, d_in: int) -> str:
    """Resolve the delta's layout and check its shapes against the layer (E022, E051)."""
    want = delta.layout or layout
    if want != layout:
        raise ShapeMismatchError(
            f"{delta.name}: adapter says layout {want!r} but the base layer "
            f"is {layout!r}; fix the adapter's module entry"
        )
    delta.fit_to_layer(delta.d_out, d_in)
    delta.check_shapes()
    if delta.d_in != d_in:
        raise ShapeMismatchError(
            f"{delta.name}: adapter d_in={delta.d_in}, base layer d_in="
            f"{d_in}; the adapter was made for another base model"
        )
    if delta.out_slice is None:
        if delta.d_out < d_out:
            raise MergeError(
                f"{delta.name}: adapter d_out={delta.d_out} < base layer d_out="
                f"{d_out} and no out_slice; a split adapter on a fused weight needs "
                "out_slice=[start, stop]",
                code="E051",
            )
        if delta.d_out != d_out:
            raise ShapeMismatchError(
                f"{delta.name}: adapter d_out={delta.d_out}, base layer "
                f"d_out={d_out}; the adapter was made for another base"
            )
    else:
        start, stop = delta.out_slice
        if stop > d_out or stop - start != delta.d_out:
            raise ShapeMismatchError(
                f"{delta.name}: out_slice [{start}, {stop}) with d_out={delta.d_out} does not fit "
                f"the layer's out dimension {d_out}; fix out_slice"
            )
    return layout


def validate(model: nn.Module, deltas: list[ModuleDelta], *, untie: bool = False) -> None:
    """Run every per-module check of spec 5.2 steps 1-3 without changing the model."""
    for delta in deltas:
        module = resolve_module(model, delta.name, delta.recorded_name)
        layout = layer_layout(module, delta.name)
        check_delta_against_layer(delta, layout, *logical_shape(module, layout))
        if delta.expected_base is not None and not torch.equal(
            torch.from_numpy(np.asarray(delta.expected_base, np.float32)),
            weight_of(module).detach().to(torch.float32),
        ):
            raise BaseMismatchError(
                f"{delta.name}: the adapter carries a saved base weight that differs from the "
                "base model's; it was trained on another base (or a resized vocabulary)"
            )
        if not untie and _is_tied(model, module):
            raise MergeError(
                f"{delta.name} shares its weight with the tied input/output embedding "
                "(tie_word_embeddings=True); merging would silently change both. Pass --untie "
                "(merge.untie=true) to untie them, which doubles that matrix's memory",
                code="E050",
            )


def _delta_tensor(delta: ModuleDelta) -> torch.Tensor:
    """The update dW = s * B @ A as an fp32 (d_out, d_in) tensor (spec 5.2 step 5: fp32 matmul)."""
    if delta.dense is not None:
        return torch.from_numpy(np.asarray(delta.dense, dtype=np.float32))
    b = torch.from_numpy(np.ascontiguousarray(delta.B, dtype=np.float32))
    a = torch.from_numpy(np.ascontiguousarray(delta.A, dtype=np.float32))
    dw = b @ a
    dw *= float(delta.scale)
    return dw


def _stored_update(deltas: list[ModuleDelta], layout: str, shape: torch.Size) -> torch.Tensor:
    """Sum of the deltas in the weight's stored layout (a view when there is one full delta)."""
    if len(deltas) == 1 and deltas[0].out_slice is None:
        dw = _delta_tensor(deltas[0])
        return dw if layout == "linear" else dw.T
    added = torch.zeros(shape, dtype=torch.float32)
    for delta in deltas:
        dw = _delta_tensor(delta)
        start, stop = delta.out_slice if delta.out_slice is not None else (0, dw.shape[0])
        if layout == "linear":
            added[start:stop] += dw
        else:
            added[:, start:stop] += dw.T
    return added


def _rows(tensor: torch.Tensor, layout: str, rows: tuple[int, int]) -> torch.Tensor:
    """A view of logical output rows ``rows`` of a weight stored in ``layout``."""
    start, stop = rows
    return tensor[start:stop] if layout == "linear" else tensor[:, start:stop]


_NORM_CHUNK_VALUES = 1 << 18
"""Values per float64 scratch block of :func:`_row_norms_f64` (2 MiB)."""


def _row_norms_f64(view: torch.Tensor, layout: str) -> torch.Tensor:
    """The float64 L2 norm of each logical output row of ``view`` (fp32, stored ``layout``).

    In float64 so the factor m / n does not depend on the summation order. The rows are widened a
    block at a time, never the whole weight at once: a second full float64 copy would be twice the
    fp32 weight (an embedding's is 216 MiB on SmolLM2), and the small blocks stay in cache
    (6x faster on a 49152 x 576 linear weight). Row norms are bit-identical to one full copy's;
    the column norms of a stored-transposed weight (conv1d, embedding) may differ in the last
    float64 bit, far below the fp32 rounding of the result.
    """
    axis = 1 if layout == "linear" else 0  # the input axis of the stored layout
    n_rows, width = view.shape[1 - axis], max(view.shape[axis], 1)
    step = max(1, _NORM_CHUNK_VALUES // width)
    norm = torch.empty(n_rows, dtype=torch.float64)
    for start in range(0, n_rows, step):
        block = view[start : start + step] if axis == 1 else view[:, start : start + step]
        norm[start : start + step] = torch.linalg.vector_norm(block.to(torch.float64), dim=axis)
    return norm


def _apply_dora(
    name: str, merged32: torch.Tensor, layout: str, deltas: list[ModuleDelta]
) -> list[float] | None:
    """Rescale each DoRA delta's output rows of ``merged32`` (W + dW) in place.

    Returns [min, max] of the factors m / n over every DoRA row, or None without DoRA.

    Raises:
        MergeError: E052 for a DoRA delta whose rows another delta of the weight also updates
            (the norm would mix two adapters), E030 for a zero row norm.
    """
    spans = [(d, d.out_slice or (0, d.d_out)) for d in deltas]
    factors: list[torch.Tensor] = []
    for delta, rows in spans:
        if delta.magnitude is None:
            continue
        for other, (start, stop) in spans:
            if other is not delta and start < rows[1] and rows[0] < stop:
                raise MergeError(
                    f"{name}: DoRA rows {list(rows)} overlap another delta's rows "
                    f"[{start}, {stop}); DoRA normalises W + dW per row, so one adapter per row",
                    code="E052",
                )
        view = _rows(merged32, layout, rows)
        norm = _row_norms_f64(view, layout)
        if not bool((norm > 0).all()):
            raise NonFiniteError(
                f"{name}: W + dW has a zero row, so DoRA's m / ||W + dW|| is undefined; the "
                "adapter was not trained on this base"
            )
        magnitude = torch.from_numpy(np.asarray(delta.magnitude, dtype=np.float64))
        factor = (magnitude / norm).to(torch.float32)
        view.mul_(factor.view(-1, 1) if layout == "linear" else factor.view(1, -1))
        factors.append(factor)
    if not factors:
        return None
    every = torch.cat(factors)
    return [float(every.min()), float(every.max())]


def _merge_one(
    name: str,
    module: nn.Module,
    layout: str,
    deltas: list[ModuleDelta],
    target: torch.dtype | None,
) -> ModuleStats:
    weight = weight_of(module)
    w = weight.detach()
    out_dtype = target or w.dtype
    added = _stored_update(deltas, layout, w.shape)
    w32 = w if w.dtype == torch.float32 else w.to(torch.float32)
    merged32 = w32 + added  # fp32 add into a new tensor; the base weight is untouched so far
    magnitude_factor = _apply_dora(name, merged32, layout, deltas)
    if magnitude_factor is not None:
        added = merged32 - w32  # DoRA's update is the rescaled weight's change, not dW
    if not torch.isfinite(merged32).all():
        where = "dW" if not torch.isfinite(added).all() else "W + dW"
        raise NonFiniteError(
            f"{name}: {where} contains NaN/Inf in fp32; the adapter's factors "
            "are too large or corrupted"
        )
    merged = merged32 if out_dtype == torch.float32 else merged32.to(out_dtype)  # ONE rounding
    if merged is not merged32 and not torch.isfinite(merged).all():
        limit = torch.finfo(out_dtype).max
        raise MergeError(
            f"{name}: merged weight overflows {out_dtype} (max |W'| "
            f"{float(merged32.abs().max()):.6g} > {limit:.6g}); keep "
            "merge.dtype=float32 or bfloat16",
            code="E080",
        )
    # Fidelity against the base rounded to the output dtype, so a dtype change of the base alone
    # is not counted as lost update (docs/rslora-format.md).
    ref = w32 if out_dtype == w.dtype == torch.float32 else w.to(out_dtype).to(torch.float32)
    change = merged32 - ref if merged is merged32 else merged.to(torch.float32) - ref
    nonzero = added != 0
    n_nonzero = int(nonzero.sum())
    delta_norm = float(torch.linalg.vector_norm(added))
    stats = ModuleStats(
        module=name,
        layout=layout,
        deltas=len(deltas),
        out_slices=[list(d.out_slice) if d.out_slice else None for d in deltas],
        base_dtype=str(w.dtype).removeprefix("torch."),
        out_dtype=str(out_dtype).removeprefix("torch."),
        max_abs_delta=float(added.abs().max()),
        delta_to_weight_norm=delta_norm / max(float(torch.linalg.vector_norm(w32)), 1e-30),
        lost_fraction=(int((nonzero & (change == 0)).sum()) / n_nonzero) if n_nonzero else 0.0,
        relative_merge_error=(
            float(torch.linalg.vector_norm(change - added)) / delta_norm if delta_norm > 0 else 0.0
        ),
        magnitude_factor=magnitude_factor,
    )
    with torch.no_grad():
        if merged.dtype == w.dtype:
            # Write into the existing storage: the loaded weights often share one big buffer, so
            # swapping in new storage would keep the old buffer alive and double peak RSS
            # (measured on SmolLM2: 1.5 GiB with a swap vs 0.95 GiB in place).
            w.copy_(merged)
        else:
            weight.data = merged
    return stats


def merge_deltas(
    model: nn.Module,
    deltas: list[ModuleDelta],
    *,
    dtype: torch.dtype | None = None,
    untie: bool = False,
    fidelity_warn_threshold: float = 0.05,
) -> list[ModuleStats]:
    """Merge every delta into ``model`` in place (spec 5.2).

    Args:
        model: a loaded torch model (HF causal LM or any nn.Module).
        deltas: from any importer.
        dtype: output dtype of the merged weights (None keeps each weight's dtype). The rest of
            the model is not converted here; the merge stage does that.
        untie: allow merging into a tied embedding/lm_head by cloning it first (E050 otherwise).
        fidelity_warn_threshold: warn when a module's relative merge error exceeds this.

    Returns:
        One ModuleStats per merged weight.

    Raises:
        RsloraDeployError: E020-E022, E030, E050, E051, E060, E080.
    """
    validate(model, deltas, untie=untie)
    by_module: dict[str, list[ModuleDelta]] = defaultdict(list)
    for delta in deltas:
        by_module[delta.name].append(delta)
    stats = []
    for name, group in by_module.items():
        module = resolve_module(model, name)
        layout = layer_layout(module, name)
        if _is_tied(model, module):
            # untie: give this module its own storage so the other side keeps the base weight
            weight = weight_of(module)
            module.weight = nn.Parameter(
                weight.detach().clone(), requires_grad=weight.requires_grad
            )
            _untie_config(model)
            logger.warning("untied %s from the shared embedding (its memory is now doubled)", name)
        row = _merge_one(name, module, layout, group, dtype)
        if row.relative_merge_error > fidelity_warn_threshold:
            logger.warning(
                "%s: %.1f%% of the update was lost to rounding to %s (relative error %.3g > %.3g);"
                " keep merge.dtype=float32 or merge right before quantization",
                name,
                100 * row.lost_fraction,
                row.out_dtype,
                row.relative_merge_error,
                fidelity_warn_threshold,
            )
        logger.debug("merged %s: %s", name, row)
        stats.append(row)
    return stats


_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
}


def _override_target(model: nn.Module, override: TensorOverride) -> tuple[nn.Module, torch.Tensor]:
    module = resolve_module(model, override.name, override.recorded_name)
    own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
    if override.param not in own:
        raise AdapterFormatError(
            f"{override.kind} tensor {override.target}: module {override.name} "
            f"({type(module).__name__}) has no tensor {override.param!r} (it has "
            f"{sorted(own)}); the adapter was made for another architecture",
            code="E020",
        )
    return module, own[override.param]


def _check_override(model: nn.Module, override: TensorOverride, tensor: torch.Tensor) -> None:
    """Exact shape and dtype checks (spec 6.1: "copy tensors with exact shape and dtype checks")."""
    base_dtype = _ST_DTYPES.get(tensor.dtype, str(tensor.dtype))
    if override.stored_dtype != base_dtype:
        raise AdapterFormatError(
            f"{override.kind} tensor {override.target} is saved as {override.stored_dtype} but "
            f"the base tensor is {base_dtype}; re-save the adapter with the base's dtype "
            "(a full copy is never cast)",
            code="E024",
        )
    shape = tuple(override.value.shape)
    if override.rows is None:
        if shape != tuple(tensor.shape):
            raise ShapeMismatchError(
                f"{override.kind} tensor {override.target} has shape {list(shape)}, the base "
                f"tensor {list(tensor.shape)}; the adapter was made for another base (or a "
                "resized vocabulary)"
            )
        return
    if (
        tensor.ndim != 2
        or shape != (len(override.rows), tensor.shape[1])
        or max(override.rows) >= tensor.shape[0]
    ):
        raise ShapeMismatchError(
            f"trainable tokens for {override.target}: {len(override.rows)} rows of shape "
            f"{list(shape)} with ids up to {max(override.rows)} do not fit the base tensor "
            f"{list(tensor.shape)}; the adapter was made for another base or vocabulary"
        )


def apply_overrides(
    model: nn.Module,
    overrides: list[TensorOverride],
    deltas: list[ModuleDelta] | None = None,
    *,
    untie: bool = False,
) -> list[dict[str, Any]]:
    """Copy PEFT ``modules_to_save`` tensors and trainable-token rows into ``model``.

    Spec 6.1 rejections: with ``allow_full_module_overrides`` these tensors are copied "with
    exact shape and dtype checks". Every override is checked before any is copied. A whole-tensor
    copy into a tied embedding/lm_head follows the E050 rule of the merge (``untie`` clones it
    first); trainable-token rows are written in place, so a tied partner sees them, as in PEFT,
    which ties the lm_head's token adapter to the embedding's.

    Returns:
        One JSON-ready row per override (for merge_report.json).

    Raises:
        RsloraDeployError: E020 (module or tensor missing), E022 (shape), E024 (dtype), E050
            (tied without untie), E070 (the tensor is also a LoRA/VeRA target).
    """
    plan = _plan_overrides(model, overrides, {d.name for d in deltas or []}, untie=untie)
    return [_copy_override(model, *planned) for planned in plan]


def _plan_overrides(
    model: nn.Module, overrides: list[TensorOverride], targets: set[str], *, untie: bool
) -> list[tuple[TensorOverride, nn.Module, torch.Tensor, bool]]:
    """Check every override before any is copied.

    Returns:
        (override, its module, the base tensor, whether that tensor is a tied embedding) each.
    """
    plan = []
    for override in overrides:
        module, tensor = _override_target(model, override)
        if override.name in targets and override.param == "weight":
            raise UnsupportedError(
                f"{override.target} is both a LoRA/VeRA target and a {override.kind} tensor; "
                "their order is ambiguous, retrain with one of them",
                code="E070",
            )
        _check_override(model, override, tensor)
        tied = override.param == "weight" and _is_tied(model, module)
        if tied and override.rows is None and not untie:
            raise MergeError(
                f"{override.target} ({override.kind}) shares its weight with the tied input/output "
                "embedding; copying it would silently change both. Pass --untie (merge.untie=true)",
                code="E050",
            )
        plan.append((override, module, tensor, tied))
    return plan


def _copy_override(
    model: nn.Module, override: TensorOverride, module: nn.Module, tensor: torch.Tensor, tied: bool
) -> dict[str, Any]:
    """Copy one checked override into the model; returns its merge_report.json row."""
    # Exact: value is the float32 widening of a tensor stored in this very dtype.
    value = torch.from_numpy(np.ascontiguousarray(override.value)).to(tensor.dtype)
    before = tensor.detach().to(torch.float32, copy=True)
    with torch.no_grad():
        if override.rows is not None:
            tensor[list(override.rows)] = value
        elif tied:
            module.weight = nn.Parameter(value.clone(), requires_grad=tensor.requires_grad)
            _untie_config(model)
            logger.warning(
                "untied %s from the shared embedding to copy its %s tensor",
                override.name,
                override.kind,
            )
        else:
            tensor.copy_(value)
    after = getattr(module, override.param).detach().to(torch.float32)
    logger.info(
        "copied %s tensor %s %s", override.kind, override.target, list(override.value.shape)
    )
    return {
        "tensor": override.target,
        "kind": override.kind,
        "recorded_name": override.recorded_name,
        "shape": list(override.value.shape),
        "dtype": override.stored_dtype,
        "rows": list(override.rows) if override.rows is not None else None,
        "max_abs_change": float((after - before).abs().max()) if before.numel() else 0.0,
    }


def verify_base(
    base_dir: Path,
    base_hashes: dict[str, str] | None,
    modules: list[str],
    *,
    allow_mismatch: bool = False,
    live_names: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Compare the adapter's recorded base fingerprints with ``base_dir`` (E010).

    ``modules`` are the *recorded* names (they enter the hash lines); ``live_names`` maps those a
    rename map changed to the names under which the base stores their weights (spec 5.2 step 1).

    Decision (docs/rslora-format.md): a ``target_weights_sha256`` difference is E010; a
    ``config_sha256`` difference alone is a warning, because config.json bytes also change with
    the transformers version that wrote them while the weights the adapter depends on do not.
    """
    from rslora_deploy.adapters.base_hash import config_sha256, target_weights_sha256

    if not base_hashes:
        return {"checked": False, "reason": "the adapter format records no base hashes"}
    want_w = base_hashes.get("target_weights_sha256")
    got_w, missing = target_weights_sha256(base_dir, modules, live_names)
    want_c = base_hashes.get("config_sha256")
    got_c = config_sha256(base_dir)
    result = {
        "checked": True,
        "target_weights_sha256": {"expected": want_w, "actual": got_w},
        "config_sha256": {"expected": want_c, "actual": got_c},
        "weights_match": want_w == got_w,
        "config_match": want_c == got_c,
    }
    if want_w != got_w:
        msg = (
            f"base mismatch: target_weights_sha256 of {base_dir} is {got_w}, the adapter "
            f"expects {want_w} (trained on {base_hashes.get('name_or_path')!r}"
            + (
                f"; weights not found for {missing[:2]}, pass --rename OLD=NEW if the base "
                "names these modules differently"
                if missing
                else ""
            )
            + "); use the adapter's base or set adapter.allow_base_mismatch=true"
        )
        if not allow_mismatch:
            raise BaseMismatchError(msg)
        logger.warning("%s (allowed)", msg)
    if want_c != got_c:
        logger.warning(
            "base config.json differs from the adapter's (config_sha256 %s != %s); weights %s",
            got_c,
            want_c,
            "match" if want_w == got_w else "differ",
        )
    return result


def stats_as_dicts(stats: list[ModuleStats]) -> list[dict[str, Any]]:
    """JSON-ready rows; ``magnitude_factor`` only on DoRA rows (other reports keep their bytes)."""
    rows = [asdict(s) for s in stats]
    for row in rows:
        if row["magnitude_factor"] is None:
            del row["magnitude_factor"]
    return rows
