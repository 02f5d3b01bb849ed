"""Stage ``check_budget``: does the exported model fit the device profile's memory?

The estimate is a sum of documented terms (docs/budget.md), each computed from the artifact or the
model config, never guessed:

    weights     = bytes of the exported model files                       (measured on disk)
    runtime     = what the profile's exporter says its graph allocates: KV cache, logits,
                  activations (``Exporter.budget_terms``; the onnxruntime-genai formulas are in
                  rslora_deploy/exporters/genai/exporter.py)
    reserved    = the profile's runtime allowance (context, kernels, workspace)

    total = weights + runtime terms + reserved;  fits = total <= memory_bytes

This is the same arithmetic as nanoGPT's ``estimate_mfu``: a formula with its inputs printed, so a
reader can check every term. The stage asks the exporter, never the target string, so a second
exporter brings its own terms.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rslora_deploy._fsutil import write_json
from rslora_deploy.artifact import Artifact
from rslora_deploy.config import BuildConfig, ExportConfig
from rslora_deploy.model_view import ModelView, model_view
from rslora_deploy.profiles import DeviceProfile
from rslora_deploy.reports import BudgetReport, MeasuredCpu, SmokeReport

if TYPE_CHECKING:
    from rslora_deploy.exporters.base import Exporter
    from rslora_deploy.stages.base import StageContext

MODEL_FILE_SUFFIXES = (".onnx", ".data", ".onnx_data")


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


def estimate(onnx_dir: Path, view: ModelView, profile: DeviceProfile) -> dict[str, Any]:
    """The budget report of an exported model (weights measured on disk)."""
    report = estimate_from_weights(weight_bytes(onnx_dir), view, profile)
    report["weights_source"] = "measured: bytes of the exported ONNX files"
    return report


def estimate_from_weights(weights: int, view: ModelView, profile: DeviceProfile) -> dict[str, Any]:
    """The budget report: every term, the total, the budget and the verdict."""
    exporter = exporter_of(profile)
    seq, batch, io = profile.max_seq_len, profile.batch_size, exporter.io_bytes(profile)
    terms = {
        "weights": weights,
        **exporter.budget_terms(view, profile),
        "reserved": profile.reserved_bytes,
    }
    total = sum(terms.values())
    return {
        "profile": profile.name,
        "fits": total <= profile.memory_bytes,
        "budget_bytes": profile.memory_bytes,
        "estimate_bytes": total,
        "headroom_bytes": profile.memory_bytes - total,
        "terms_bytes": terms,
        "inputs": {
            "batch_size": batch,
            "max_seq_len": seq,
            "kv_dtype": profile.kv_dtype.value,
            "io_bytes": io,
            "layers": view.layers,
            "kv_heads": view.kv_heads,
            "head_dim": view.head_dim,
            "heads": view.heads,
            "hidden": view.hidden,
            "intermediate": view.intermediate,
            "vocab": view.vocab,
        },
        "formula": "weights + kv_cache + logits + activations + reserved <= memory_bytes "
        "(docs/budget.md)",
        "notes": profile.notes,
    }


def decoder_linear_params(view: ModelView) -> int:
    """Weights of the quantized decoder projections (Llama family: q, k, v, o, gate, up, down)."""
    attn = view.hidden * view.head_dim * (2 * view.heads + 2 * view.kv_heads)
    mlp = 3 * view.hidden * view.intermediate
    return view.layers * (attn + mlp)


def predict_weight_bytes(
    view: ModelView,
    bits: int,
    group_size: int,
    profile: DeviceProfile,
    lm_head_int4: bool = False,
    context_length: int = 8192,
) -> dict[str, int]:
    """Predict the exported ONNX weight bytes before quantizing (``rslora-deploy budget --model``).

    Mirrors what the onnxruntime-genai builder writes for a GPTQ/AWQ checkpoint:

        projections  = P * bits/8 + P/g * (scale_bytes + bits/8)         (MatMulNBits, zero points)
        lm_head      = V*H * io_bytes, or V*H/2 + V*H/32 * scale_bytes (int4, block 32)
        embedding    = 0 when tied (the builder shares lm_head's table), else as lm_head
        rope_cache   = 2 * context_length * head_dim/2 * io_bytes          (cos and sin tables)
        norms        = (2*layers + 1) * H * io_bytes

    with P = decoder projection weights, g = group size, V = vocab, H = hidden, and scales stored
    in the activation dtype (fp16 for a cuda target, fp32 for cpu).
    """
    io = io_bytes(profile)
    params = decoder_linear_params(view)
    group = group_size if group_size > 0 else view.hidden
    vocab_hidden = view.vocab * view.hidden
    int4_table = vocab_hidden // 2 + vocab_hidden // 32 * io
    lm_head = int4_table if lm_head_int4 else vocab_hidden * io
    return {
        "projections": params * bits // 8 + params // group * io + params // group * bits // 8,
        "embedding": 0 if view.tie_word_embeddings else lm_head,
        "lm_head": lm_head,
        "rope_cache": 2 * context_length * (view.head_dim // 2) * io,
        "norms": (2 * view.layers + 1) * view.hidden * io,
    }


def measured_cpu(smoke: SmokeReport, profile: DeviceProfile) -> MeasuredCpu:
    """The verify run's peak RSS, with what it does and does not show for this profile.

    The KV cache is preallocated to the package's max_length in that run, so for a package whose
    exporter says a CPU run is representative (a CPU-target graph) it is a real measurement of
    the runtime; the estimate must cover it (tests/integration/test_build_real.py). A CUDA-target
    graph run on the CPU EP gets fp32 casts of its fp16 tensors, so there it is only a smoke check.
    """
    comparable = exporter_of(profile).measurement_comparable(profile)
    return MeasuredCpu(
        peak_rss_bytes=smoke.peak_rss_bytes,
        kv_max_length=smoke.kv_max_length,
        comparable_to_estimate=comparable,
        note=(
            "peak RSS of the runtime running this package on the CPU with its full KV cache"
            if comparable
            else "CPU proxy run of a device-target graph (the CPU EP adds fp32 casts): a "
            "smoke check only, not the device's memory"
        ),
    )


class BudgetStage:
    """Stage ``check_budget``: the estimate of the exported model against the profile."""

    name: ClassVar[str] = "check_budget"

    def section(self, config: BuildConfig) -> ExportConfig:
        """The ``[export]`` section (the budget follows what was exported)."""
        return config.export

    def run(self, artifact: Artifact, cfg: ExportConfig, ctx: StageContext) -> Artifact:
        """Estimate, attach the smoke run's measurement, write ``reports/budget.json``."""
        view = model_view(ctx.artifacts["merge_adapter"].path)
        report = BudgetReport.model_validate(estimate(artifact.path, view, ctx.profile))
        if ctx.smoke is not None:
            report.measured_cpu = measured_cpu(ctx.smoke, ctx.profile)
        # The measured RSS goes to build.json (nondeterministic), not the hashed budget.json.
        write_json(
            ctx.reports / "budget.json", report.model_dump(mode="json", exclude={"measured_cpu"})
        )
        ctx.budget = report
        return artifact
