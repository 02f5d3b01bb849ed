"""What fits: the largest max_length and batch under a budget, and changes that would fit.

Every term of the estimate (``memory/estimate.py``) grows monotonically with max_length and batch,
so "the largest that fits" is a binary search over the same arithmetic the budget report prints;
nothing here has a formula of its own. A change is re-priced by the estimate with one input
changed:

    shorter context      max_length -> the largest that fits
    lm_head precision    lm_head int4 (block 32) instead of full precision  (weights delta)
    group size           the next larger group (fewer scales and zero points)  (weights delta)
    bits                 a lower supported bit width                          (weights delta)
    last-token logits    logits for the last position only during prefill     (logits term)

Weight deltas come from :func:`rslora_deploy.exporters.genai.sizes.predict_weight_bytes` (the
builder's layout), applied to the package's measured weight bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from rslora_deploy.errors import ConfigError
from rslora_deploy.memory.estimate import Shape, estimate_from_weights, predict_weight_bytes
from rslora_deploy.model_view import ModelView
from rslora_deploy.profiles import DeviceProfile

#: Shortest context worth proposing: a prompt plus the 16 decoded tokens of the worst-case probe.
MIN_LENGTH = 32
MAX_BATCH = 256
GROUPS = (32, 64, 128, 256)


@dataclass(frozen=True)
class Layout:
    """The weight layout the weights term was measured or predicted for."""

    weights: int
    bits: int = 4
    group_size: int = 64
    lm_head_int4: bool = False


def total(layout: Layout, view: ModelView, profile: DeviceProfile, shape: Shape) -> int:
    """The estimate's total for this layout and shape."""
    return int(estimate_from_weights(layout.weights, view, profile, shape)["estimate_bytes"])


def _largest(fits: Any, low: int, high: int) -> int | None:
    """Largest n in [low, high] with fits(n), for a monotone (true then false) predicate."""
    if not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def context_limit(view: ModelView, profile: DeviceProfile) -> int:
    """The longest max_length worth searching: the model's context, else 1M tokens."""
    return view.context_length or 1 << 20


def largest_max_length(
    layout: Layout, view: ModelView, profile: DeviceProfile, shape: Shape
) -> int | None:
    """Largest max_length (at ``shape``'s batch) whose estimate fits, or None."""
    limit = context_limit(view, profile)
    return _largest(
        lambda n: (
            total(layout, view, profile, replace(shape, max_length=n)) <= profile.memory_bytes
        ),
        min(MIN_LENGTH, limit),
        limit,
    )


def largest_batch(
    layout: Layout, view: ModelView, profile: DeviceProfile, shape: Shape
) -> int | None:
    """Largest batch (at ``shape``'s max_length) whose estimate fits, or None."""
    return _largest(
        lambda b: total(layout, view, profile, replace(shape, batch=b)) <= profile.memory_bytes,
        1,
        MAX_BATCH,
    )


def validate_shape(view: ModelView, shape: Shape) -> None:
    """Refuse sizes the solver cannot price.

    Raises:
        ConfigError: naming ``max_length`` or ``batch_size``.
    """
    if shape.max_length <= 0:
        raise ConfigError(f"max_length must be a positive number of tokens, got {shape.max_length}")
    if shape.batch <= 0:
        raise ConfigError(f"batch_size must be a positive number of sequences, got {shape.batch}")
    if view.context_length and shape.max_length > view.context_length:
        raise ConfigError(
            f"max_length {shape.max_length} is above the model's context "
            f"({view.context_length}, max_position_embeddings); use at most {view.context_length}"
        )


def _weights_with(layout: Layout, view: ModelView, profile: DeviceProfile, **change: Any) -> int:
    """The layout's weights re-priced with one change, by the predicted delta."""
    before = predict_weight_bytes(
        view, layout.bits, layout.group_size, profile, lm_head_int4=layout.lm_head_int4
    )
    new = replace(layout, **change)
    after = predict_weight_bytes(
        view, new.bits, new.group_size, profile, lm_head_int4=new.lm_head_int4
    )
    return layout.weights + sum(after.values()) - sum(before.values())


def _shape_with(
    shape: Shape, layout: Layout, view: ModelView, profile: DeviceProfile, change: dict[str, Any]
) -> Shape:
    """``shape`` after a weight change, for the terms that follow the graph's layout.

    An int4 head is no float head (no ``lm_head_prepack``). A level-4 graph's packed bytes
    (``nbits_prepack``) follow its ``MatMulNBits`` weights: a new int4 head adds its table, a
    new group size or bit width moves them by the projections' delta.
    """
    if not shape.level4_nbits_bytes:
        return replace(shape, float_lm_head=False) if change.get("lm_head_int4") else shape
    before = predict_weight_bytes(
        view, layout.bits, layout.group_size, profile, lm_head_int4=layout.lm_head_int4
    )
    new = replace(layout, **change)
    after = predict_weight_bytes(
        view, new.bits, new.group_size, profile, lm_head_int4=new.lm_head_int4
    )
    level4 = shape.level4_nbits_bytes + after["projections"] - before["projections"]
    if change.get("lm_head_int4"):
        return replace(shape, float_lm_head=False, level4_nbits_bytes=level4 + after["lm_head"])
    return replace(shape, level4_nbits_bytes=level4)


def _candidates(layout: Layout, view: ModelView, profile: DeviceProfile) -> list[tuple]:
    """(name, new layout, shape change) for every single change that could save bytes.

    Weight changes are priced by the onnxruntime-genai builder's layout; another exporter's
    package (ascend-om ships fp16 weights, no groups, no quantized head) gets none of them.
    """
    from rslora_deploy.memory.estimate import exporter_of

    out: list[tuple] = []
    if exporter_of(profile).name != "onnxruntime-genai":
        return [("last-token logits (export.last_token_logits = true)", {}, {"last": True})]
    if not layout.lm_head_int4:
        out.append(("lm_head int4 (export.lm_head = int4)", {"lm_head_int4": True}, {}))
    larger = [
        g for g in GROUPS if 0 < layout.group_size < g and view.hidden % g == 0
    ]  # fmt: skip  (per-channel, group -1, has no larger group)
    if larger:
        out.append((f"group size {larger[0]}", {"group_size": larger[0]}, {}))
    lower = [b for b in sorted(profile.supported_bits) if b < layout.bits]
    if lower:
        out.append((f"{lower[-1]}-bit weights", {"bits": lower[-1]}, {}))
    out.append(("last-token logits (export.last_token_logits = true)", {}, {"last": True}))
    return out


def solve(layout: Layout, view: ModelView, profile: DeviceProfile, shape: Shape) -> dict[str, Any]:
    """The solver's answer: what fits at this layout, and what single changes would fit.

    Returns a dict with the current total, ``largest_max_length`` and ``largest_batch`` (None
    when nothing fits), and ``changes``: each change with its predicted total and whether it
    fits, smallest total first.
    """
    validate_shape(view, shape)
    now = total(layout, view, profile, shape)
    answer: dict[str, Any] = {
        "profile": profile.name,
        "budget_bytes": profile.memory_bytes,
        "max_length": shape.max_length,
        "batch": shape.batch,
        "total_bytes": now,
        "fits": now <= profile.memory_bytes,
        "largest_max_length": largest_max_length(layout, view, profile, shape),
        "largest_batch": largest_batch(layout, view, profile, shape),
        "changes": [],
    }
    if answer["largest_max_length"] is not None and not answer["fits"]:
        short = replace(shape, max_length=answer["largest_max_length"])
        answer["changes"].append(
            _change(f"max_length {short.max_length}", total(layout, view, profile, short), profile)
        )
    for name, weights_change, shape_change in _candidates(layout, view, profile):
        if shape_change and shape.last_token_logits:
            continue
        new_layout, new_shape = layout, shape
        if weights_change:
            weights = _weights_with(layout, view, profile, **weights_change)
            new_layout = replace(layout, weights=weights)
            new_shape = _shape_with(shape, layout, view, profile, weights_change)
        if shape_change:
            new_shape = replace(new_shape, last_token_logits=True)
        answer["changes"].append(
            _change(name, total(new_layout, view, profile, new_shape), profile)
        )
    answer["changes"].sort(key=lambda c: c["total_bytes"])
    return answer


def _change(name: str, predicted: int, profile: DeviceProfile) -> dict[str, Any]:
    return {"change": name, "total_bytes": predicted, "fits": predicted <= profile.memory_bytes}


def summary(answer: dict[str, Any]) -> str:
    """One line for the terminal and the build report."""
    mib = 2**20
    if answer["fits"]:
        return (
            f"fits at max_length {answer['max_length']}: {answer['total_bytes'] / mib:.0f} of "
            f"{answer['budget_bytes'] / mib:.0f} MiB; largest max_length "
            f"{answer['largest_max_length']}, largest batch {answer['largest_batch']}"
        )
    largest = answer["largest_max_length"]
    head = (
        f"does not fit at max_length {answer['max_length']} "
        f"({answer['total_bytes'] / mib:.0f} of {answer['budget_bytes'] / mib:.0f} MiB); "
    )
    if largest is None:
        return head + "no max_length fits at this layout"
    return head + f"the largest max_length that fits is {largest}"
