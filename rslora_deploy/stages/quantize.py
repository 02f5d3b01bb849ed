"""Stage ``quantize``: merged full-precision model -> GPTQ/AWQ-format Hugging Face checkpoint.

Artifact in (``hf``), artifact out (``hf-quantized``). Everything that can be checked before the
engine runs is checked first (bits, group size against every layer width, calibration data), so a
bad input fails in seconds and leaves nothing behind. A checkpoint that is already GPTQ/AWQ
(AutoGPTQ, AutoAWQ, gptqmodel) is checked for config/tensor consistency and passed through.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rslora_deploy.artifact import Artifact
from rslora_deploy.config import BuildConfig, QuantizeConfig
from rslora_deploy.errors import ConfigError, QuantizationError, UnsupportedError
from rslora_deploy.quantizers import QUANTIZERS
from rslora_deploy.quantizers.base import QuantizeExtras
from rslora_deploy.quantizers.checkpoint import (
    LinearSpec,
    check_prequantized,
    decoder_linears,
    quantization_config,
    read_config,
)

if TYPE_CHECKING:
    from rslora_deploy.stages.base import StageContext

logger = logging.getLogger(__name__)


def is_prequantized(model_dir: Path) -> bool:
    """True when ``model_dir`` declares a quantization config (GPTQ/AWQ or anything else)."""
    return quantization_config(Path(model_dir)) is not None


def validate_shapes(
    linears: list[LinearSpec], cfg: QuantizeConfig, packs_output_features: bool = False
) -> None:
    """Check that ``group_size`` and int32 packing fit every quantized layer.

    Raises:
        ConfigError: naming the first layer that does not fit and the fix.
    """
    per_word = 32 // cfg.bits
    widths = {spec.in_features for spec in linears}
    for spec in linears:
        if cfg.group_size != -1 and spec.in_features % cfg.group_size:
            working = [g for g in (32, 64, 128, 256) if all(w % g == 0 for w in widths)]
            raise ConfigError(
                f"quantize.group_size={cfg.group_size} does not divide the input width of layer "
                f"{spec.name!r} ({spec.in_features}); group sizes that divide every quantized "
                f"layer's width: {', '.join(map(str, working)) or 'none of 32-256 (use -1)'}"
            )
        packed = spec.out_features if packs_output_features else spec.in_features
        if packed % per_word:
            raise ConfigError(
                f"layer {spec.name!r} width {packed} cannot be packed {per_word} values per "
                f"int32 at bits={cfg.bits}; use --bits 4 or 8 on a model whose widths are "
                f"multiples of {per_word}"
            )


def quantize_model(
    merged: Artifact,
    out_dir: Path,
    cfg: QuantizeConfig,
    *,
    extras: QuantizeExtras | None = None,
) -> Artifact:
    """Quantize the merged model into ``out_dir`` with ``cfg.method``.

    Args:
        merged: the ``hf`` artifact of the merge stage (or an already-quantized checkpoint).
        out_dir: a fresh directory the caller owns (created if missing; must be empty).
        cfg: the ``[quantize]`` section.
        extras: engine options beyond the recipe (benchmarks, ``--protect-adapter``).

    Returns:
        ``Artifact("hf-quantized", out_dir, meta)`` with method, bits, group_size, sym, desc_act,
        calib (samples, seq_len, source, sha256), seconds and the handler's facts. For an
        already-quantized input the artifact points at the input directory and
        ``meta["prequantized"]`` is True; nothing is written.

    Raises:
        ConfigError: unsupported bits or a group size that does not divide a layer width.
        CalibrationDataError: empty, too short or unreadable calibration data.
        UnsupportedError: an architecture the engine cannot handle.
        NonFiniteError: NaN/Inf in a merged weight (RTN checks each weight as it goes).
        NonFiniteQuantizationError: NaN/Inf during calibration or in the result (GPTQ/AWQ; the
            result check also covers the source tensors it restores). Not scanned up front:
            that cost ~13 s on SmolLM2 on a busy 2-core box, and merge already checks.
        QuantizationError: any other engine failure.
    """
    extras = extras or QuantizeExtras()
    model_dir = Path(merged.path)
    if is_prequantized(model_dir):
        summary = check_prequantized(model_dir)
        logger.info("quantize: %s is already %s-quantized; skipping", model_dir, summary["method"])
        return Artifact(
            "hf-quantized", model_dir, {**summary, "prequantized": True, "seconds": 0.0}
        )
    method = cfg.method
    handler = QUANTIZERS.get(method)()
    if cfg.bits not in handler.supported_bits:
        raise ConfigError(
            f"quantize.bits={cfg.bits} is not supported by method {method}; "
            f"use one of {list(handler.supported_bits)}"
        )
    model_type = read_config(model_dir).get("model_type")
    reason = handler.unsupported_model_types.get(str(model_type))
    if reason is not None:
        # Only the methods that take this model type (gptq and awq both refuse Phi-3).
        others = " or ".join(
            n
            for n in QUANTIZERS.names()
            if n != method and str(model_type) not in QUANTIZERS.get(n).unsupported_model_types
        )
        raise UnsupportedError(
            f"method {method} cannot quantize model_type {model_type!r}: {reason}; "
            f"use --method {others}"
        )
    linears = decoder_linears(model_dir)
    if not linears:
        raise UnsupportedError(
            f"no nn.Linear layers in the decoder blocks of {model_dir} (GPT-2 style Conv1D "
            "layers are not supported); use a Llama, Qwen2/3, Mistral, Phi-3, Gemma-3 or GLM-4 "
            "style model"
        )
    validate_shapes(linears, cfg, handler.packs_output_features)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise QuantizationError(f"output directory {out_dir} is not empty; pass a fresh directory")
    calib = _calibration(model_dir, cfg) if handler.needs_calibration else None
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info(
        "quantize: %s bits=%d group=%d sym=%s desc_act=%s on %d layers",
        method,
        cfg.bits,
        cfg.group_size,
        cfg.sym,
        cfg.desc_act,
        len(linears),
    )
    start = time.perf_counter()
    facts = handler.quantize(model_dir, out_dir, cfg, calib, extras)
    seconds = time.perf_counter() - start
    logger.info("quantize: %s done in %.1f s", method, seconds)
    meta: dict[str, Any] = {
        "method": method, "bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym,
        "desc_act": cfg.desc_act, "damp_percent": cfg.damp_percent,
        "calib": calib.meta if calib is not None else None, "seconds": round(seconds, 2),
        "layers": len(linears), "lm_head": "full precision", "prequantized": False,
        "extras": extras.model_dump(exclude_defaults=True), **facts,
    }  # fmt: skip
    return Artifact("hf-quantized", out_dir, meta)


def _calibration(model_dir: Path, cfg: QuantizeConfig) -> Any:
    from transformers import AutoTokenizer

    from rslora_deploy.data.calibration import build_calibration

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    return build_calibration(
        tokenizer, cfg.calib_samples, cfg.calib_seq_len, seed=cfg.seed, path=cfg.calib_path
    )


class QuantizeStage:
    """Stage ``quantize``: merged HF dir -> GPTQ/AWQ/RTN checkpoint (``--protect-adapter`` too)."""

    name: ClassVar[str] = "quantize"

    def section(self, config: BuildConfig) -> QuantizeConfig:
        """The ``[quantize]`` section."""
        return config.quantize

    def run(self, artifact: Artifact, cfg: QuantizeConfig, ctx: StageContext) -> Artifact:
        """Quantize ``artifact`` into the work dir; an already-quantized input passes through."""
        extras, protection = None, None
        base = ctx.inputs.base.path if ctx.inputs else artifact.path
        if cfg.protect_adapter and not is_prequantized(artifact.path):
            from rslora_deploy.quantizers.protection import plan_protection

            extras, protection = plan_protection(
                base, artifact.path, cfg, cfg.protect_ratio, ctx.exporter.fused_groups
            )
        result = quantize_model(artifact, ctx.work / "quantized", cfg, extras=extras)
        if protection is not None:
            # The regex list is in the checkpoint's quantization_config; the manifest keeps the
            # count.
            result.meta.get("extras", {}).pop("dynamic", None)
            result.meta["protection"] = protection
        return result
