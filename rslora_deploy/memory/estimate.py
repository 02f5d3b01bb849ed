"""The memory estimate: does an exported model fit a device profile's memory?

Used by stage ``check_budget``, ``rslora-deploy budget`` and the solver. The estimate is a sum of
documented terms (docs/budget.md), each computed from the artifact or the model config:

    weights     = bytes of model.onnx + its external data file(s)          (measured on disk)
    runtime     = what the profile's exporter says its graph allocates at the package's shape
                  (``Exporter.budget_terms``: kv_cache, logits, activations...; the
                   onnxruntime-genai formulas are in rslora_deploy/exporters/genai/exporter.py)
    slack       = profile.model_slack * (weights + runtime terms)
                  (what the runtime allocates beyond the terms, measured per runtime)
    load_transient = max(0, profile.load_factor * weights - (all of the above))
                  (loading peaks above the run: initializers read, then prepacked copies made
                   before the originals are freed; measured per runtime)
    reserved    = the profile's runtime context (measured, or an allowance that says so)

    total = sum of the terms = reserved + max(load peak, run peak);  fits = total <= memory

This is the same arithmetic as nanoGPT's ``estimate_mfu``: a formula with its inputs printed, so a
reader can check every term. The stage asks the exporter, never the target string, so a second
exporter brings its own terms.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rslora_deploy.exporters.base import Shape
from rslora_deploy.exporters.genai.sizes import (
    initializer_bytes,
    level4_nbits_bytes,
    predict_weight_bytes,
)
from rslora_deploy.model_view import ModelView, decoder_linear_params
from rslora_deploy.profiles import DeviceProfile

if TYPE_CHECKING:
    from rslora_deploy.exporters.base import Exporter

MODEL_FILE_SUFFIXES = (".onnx", ".data", ".onnx_data")
#: Re-exported: the budget's callers price configs with these (their homes: model_view and the
#: genai exporter, which must not import this module).
__all__ = [
    "decoder_linear_params",
    "initializer_bytes",
    "level4_nbits_bytes",
    "predict_weight_bytes",
]


def weight_bytes(onnx_dir: Path) -> int:
    """Bytes of the ONNX graph and its external weight files."""
    return sum(
        p.stat().st_size for p in Path(onnx_dir).iterdir()
        if p.is_file() and p.name.endswith(MODEL_FILE_SUFFIXES)
    )  # fmt: skip


def exporter_of(profile: DeviceProfile) -> Exporter:
    """The profile's registered exporter."""
    from rslora_deploy.exporters import get_exporter

    return get_exporter(profile.exporter)


def io_bytes(profile: DeviceProfile) -> int:
    """Bytes per activation element of the graph the profile's exporter writes."""
    return exporter_of(profile).io_bytes(profile)


def package_shape(onnx_dir: Path, profile: DeviceProfile) -> Shape:
    """What an exported folder is sized for, as the profile's exporter reads it from the folder."""
    return exporter_of(profile).package_shape(Path(onnx_dir), profile)


def estimate(
    onnx_dir: Path, view: ModelView, profile: DeviceProfile, adapter_bytes: int = 0
) -> dict[str, Any]:
    """The budget report of an exported model (weights measured on disk, shape read from it).

    ``adapter_bytes``: the run-time adapter files of a multi-adapter package, all resident at once
    (docs/adapters-runtime.md); priced as their file bytes, an extra ``adapters`` term.
    """
    report = estimate_from_weights(
        weight_bytes(onnx_dir), view, profile, package_shape(onnx_dir, profile), adapter_bytes
    )
    report["weights_source"] = "measured: bytes of the exported ONNX files"
    return report


def estimate_from_weights(
    weights: int,
    view: ModelView,
    profile: DeviceProfile,
    shape: Shape | None = None,
    adapter_bytes: int = 0,
) -> dict[str, Any]:
    """The budget report: every term, the total, the budget and the verdict."""
    shape = shape or Shape.of(profile)
    exporter = exporter_of(profile)
    terms = {"weights": weights, **exporter.budget_terms(view, profile, shape=shape)}
    if adapter_bytes:
        terms["adapters"] = adapter_bytes
    if profile.model_slack:
        terms["slack"] = round(profile.model_slack * sum(terms.values()))
    run_peak = sum(terms.values())
    # Loading can peak above the run (initializers read, then prepacked copies made before the
    # originals are freed): the model part is max(load peak, run peak), written as an excess.
    load_excess = round(profile.load_factor * weights) - run_peak
    if load_excess > 0:
        terms["load_transient"] = load_excess
    terms["reserved"] = profile.reserved_bytes
    total = sum(terms.values())
    return {
        "profile": profile.name,
        "fits": total <= profile.memory_bytes,
        "budget_bytes": profile.memory_bytes,
        "estimate_bytes": total,
        "headroom_bytes": profile.memory_bytes - total,
        "terms_bytes": terms,
        "inputs": {
            "batch_size": shape.batch,
            "max_seq_len": shape.max_length,
            "logits_positions": "last" if shape.last_token_logits else "all",
            "kv_dtype": profile.kv_dtype.value,
            "io_bytes": exporter.io_bytes(profile),
            "model_slack": profile.model_slack,
            "load_factor": profile.load_factor,
            "activation_factor": profile.activation_factor,
            "attention_scores": profile.attention_scores,
            "float_lm_head": shape.float_lm_head,
            **{k: v for k, v in view.to_dict().items() if type(v) is int},
        },
        "reserved_source": profile.reserved_source.model_dump(mode="json"),
        "formula": "reserved + max(load_factor * weights, (1 + model_slack) * (weights + "
        "kv_cache + logits + activations)) <= memory_bytes (docs/budget.md)",
        "notes": profile.notes,
    }


def predict(
    view: ModelView, profile: DeviceProfile, bits: int, group_size: int
) -> tuple[dict[str, int], Shape]:
    """Bytes per part and shape of what ``build`` would ship for ``view`` on ``profile``.

    The profile's exporter prices its own default layout (``Exporter.predict_weights``: the
    int4 head on a CPU target, fp16 weights on Ascend); every exporter implements it.
    """
    parts, shape = exporter_of(profile).predict_weights(view, profile, bits, group_size)
    return dict(parts), shape
