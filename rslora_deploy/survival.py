"""Adapter survival: how much of the adapter's effect the quantized model keeps.

With the base model ``B``, the merged model ``M = B + ΔW`` and its quantized form ``Q``, on
evaluation text (positions ``t``, next-token distributions ``P_X(t)``):

* effect      ``E = mean_t KL(P_M(t) || P_B(t))``  (what the adapter changed);
* residual    ``R = mean_t KL(P_M(t) || P_Q(t))``  (how far quantization moved away from M);
* **retained** ``= <ℓ_Q - ℓ_B, ℓ_M - ℓ_B> / ||ℓ_M - ℓ_B||^2`` with ``ℓ`` the row-centred
  log-probabilities: the share of the adapter's shift, along its own direction, that Q shows
  (1.0 = fully kept, 0 = behaves like the base). Quantization noise orthogonal to the shift does
  not count against it.
* ``retained_kl = 1 - R / E``: 1.0 means Q behaves like M, 0 means Q is as far from M as the
  base is; below 0 when quantization noise exceeds the adapter's effect. ``R`` contains all
  quantization noise, adapter-related or not, so this is a pessimistic bound.
* loss view: ``retained_loss = (NLL_B - NLL_Q) / (NLL_B - NLL_M)``, meaningful when the
  adapter lowers the loss on the text (its own domain).

``--protect-adapter`` keeps modules whose ΔW is small relative to the quantization step at more
bits: rounding to a step ``s`` adds an error of RMS ``s/sqrt(12)``, so a delta of RMS below
about ``s`` is mostly rounded away. :func:`delta_to_step_ratios` measures
``rms(ΔW) / mean(s)`` per module and :func:`protection_dynamic` writes gptqmodel's per-module
``dynamic`` overrides. gptqmodel honours them; transformers (optimum 2.3.0) does not (see
``evaluation.dequantized_gptq_model``); the genai 0.18 builder failed to export such a checkpoint.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
#: Modules with rms(ΔW) / quantization step below this are protected by --protect-adapter.
#: Measured on the demo adapter (4-bit g64; benchmarks/results/survival.json): ratios span
#: 0.06-0.97, so 1.0 keeps all 210 modules at 8 bits (+53.9 MB, domain perplexity 27.27 vs
#: merged 27.22); 0.15 keeps 62 (+18.0 MB, 39.42 -> 32.41). 0.15 is the default trade-off.
DEFAULT_PROTECT_RATIO = 0.15


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _centred(logp: np.ndarray) -> np.ndarray:
    """Log-probabilities minus their row mean: removes the per-row normalisation constant."""
    return logp - logp.mean(axis=-1, keepdims=True)


def kl_per_position(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """``KL(P || Q)`` per row, from logits ``[positions, vocab]`` (natural log)."""
    lp, lq = _log_softmax(p_logits), _log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def retained_fraction(effect: float, residual: float) -> float:
    """``1 - residual / effect``; NaN when there is no effect to retain."""
    if effect <= 0:
        return math.nan
    return 1.0 - residual / effect


def retained_projection(base: np.ndarray, merged: np.ndarray, quant: np.ndarray) -> float:
    """Share of the adapter's log-prob shift ``ℓ_M - ℓ_B`` that ``ℓ_Q - ℓ_B`` shows (see module)."""
    lb, lm, lq = (_centred(_log_softmax(x)) for x in (base, merged, quant))
    shift = lm - lb
    denom = float((shift * shift).sum())
    return math.nan if denom == 0 else float(((lq - lb) * shift).sum()) / denom


@dataclass
class SurvivalStats:
    """Accumulates survival statistics window by window."""

    kl_mb: float = 0.0
    kl_mq: float = 0.0
    proj_num: float = 0.0
    proj_den: float = 0.0
    nll: dict[str, float] = field(
        default_factory=lambda: {"base": 0.0, "merged": 0.0, "quantized": 0.0}
    )
    positions: int = 0

    def add(
        self,
        base: np.ndarray,
        merged: np.ndarray,
        quant: np.ndarray,
        *,
        ignore_last: bool = False,
        targets: np.ndarray | None = None,
    ) -> None:
        """Add one window's logits ``[positions, vocab]`` of B, M and Q.

        Args:
            base: base-model logits.
            merged: merged-model logits.
            quant: quantized-model logits.
            ignore_last: drop the last position (it predicts past the window).
            targets: next-token ids per position, for the loss view.
        """
        if ignore_last:
            base, merged, quant = base[:-1], merged[:-1], quant[:-1]
        lb, lm, lq = (_log_softmax(x) for x in (base, merged, quant))
        pm = np.exp(lm)
        self.kl_mb += float((pm * (lm - lb)).sum())
        self.kl_mq += float((pm * (lm - lq)).sum())
        cb, cm, cq = _centred(lb), _centred(lm), _centred(lq)
        shift = cm - cb
        self.proj_num += float(((cq - cb) * shift).sum())
        self.proj_den += float((shift * shift).sum())
        if targets is not None:
            rows = np.arange(len(targets))
            for name, lp in (("base", lb), ("merged", lm), ("quantized", lq)):
                self.nll[name] -= float(lp[rows, targets].sum())
        self.positions += len(lm)

    def summary(self, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
        """The JSON-able survival report; logs a warning when ``retained < threshold``."""
        n = max(self.positions, 1)
        effect, residual = self.kl_mb / n, self.kl_mq / n
        retained_kl = retained_fraction(effect, residual)
        # The projection is the headline: it asks how much of the adapter's shift Q keeps. The
        # KL ratio also charges Q for quantization noise unrelated to the adapter; on the demo
        # adapter at int4 that noise (KL 0.41) exceeded the adapter's whole effect (KL 0.24),
        # giving -0.73 while the projection was 0.95 (benchmarks/results/survival.json).
        retained = self.proj_num / self.proj_den if self.proj_den else math.nan
        out: dict[str, Any] = {
            "effect_kl_merged_vs_base": effect,
            "residual_kl_merged_vs_quantized": residual,
            "retained": retained,
            "retained_kl": retained_kl,
            "positions": self.positions,
            "threshold": threshold,
            "formula": "retained = <lQ - lB, lM - lB> / ||lM - lB||^2 (row-centred log-probs); "
            "retained_kl = 1 - mean KL(M||Q) / mean KL(M||B)",
        }
        if not math.isnan(retained_kl) and retained_kl < 0:
            logger.info(
                "quantization moves the model further from M (KL %.3f) than the adapter moved it "
                "from the base (KL %.3f); the adapter's direction is %.0f%% retained",
                residual,
                effect,
                100 * retained,
            )
        if any(self.nll.values()):
            nb, nm, nq = (self.nll[k] / n for k in ("base", "merged", "quantized"))
            out["nll"] = {"base": nb, "merged": nm, "quantized": nq}
            out["retained_loss"] = (nb - nq) / (nb - nm) if nb != nm else math.nan
        out["warning"] = bool(not math.isnan(retained) and retained < threshold)
        if out["warning"]:
            logger.warning(
                "adapter survival %.2f is below %.2f: quantization removed much of the adapter's "
                "effect; rebuild with --protect-adapter",
                retained,
                threshold,
            )
        return out


def delta_to_step_ratios(
    base_dir: Path, merged_dir: Path, bits: int, group_size: int, sym: bool
) -> dict[str, dict[str, float]]:
    """``rms(ΔW) / mean quantization step`` for every decoder linear whose weight changed.

    The step is the RTN group scale of the merged weight at ``bits``/``group_size``.
    """
    from rslora_deploy.quantizers import _checkpoint, _rtn_math

    base = _checkpoint.load_tensors(base_dir)
    merged = _checkpoint.load_tensors(merged_dir)
    out: dict[str, dict[str, float]] = {}
    for spec in _checkpoint.decoder_linears(merged_dir):
        key = f"{spec.name}.weight"
        delta = merged[key].astype(np.float64) - base[key].astype(np.float64)
        rms = float(np.sqrt(np.mean(delta * delta)))
        if rms == 0:
            continue
        gq = _rtn_math.quantize_rtn(merged[key], bits, group_size, sym)
        step = float(gq.scales.astype(np.float64).mean())
        out[spec.name] = {"delta_rms": rms, "step": step, "ratio": rms / step}
    return out


#: Modules that the onnxruntime-genai builder fuses into one MatMul must share their precision.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def protected_modules(
    ratios: dict[str, dict[str, float]], max_ratio: float = DEFAULT_PROTECT_RATIO
) -> list[str]:
    """Modules with ``ratio < max_ratio``, widened to their fused siblings (q/k/v, gate/up)."""
    chosen = {name for name, r in ratios.items() if r["ratio"] < max_ratio}
    for name in list(chosen):
        prefix, _, leaf = name.rpartition(".")
        for group in FUSED_SIBLINGS:
            if leaf in group:
                chosen.update(f"{prefix}.{sib}" for sib in group)
    return sorted(chosen)


def protection_dynamic(
    ratios: dict[str, dict[str, float]], max_ratio: float = DEFAULT_PROTECT_RATIO, bits: int = 8
) -> dict[str, dict[str, Any]]:
    """gptqmodel ``dynamic`` overrides keeping :func:`protected_modules` at ``bits``.

    The pattern is the exact module name, anchored, so nothing else matches.
    """
    return {
        f"+:^{name.replace('.', chr(92) + '.')}$": {"bits": bits}
        for name in protected_modules(ratios, max_ratio)
    }


def gptq_layer_bytes(in_features: int, out_features: int, bits: int, group_size: int) -> int:
    """Bytes of one GPTQ layer: qweight + qzeros (``bits`` each) + fp16 scales + int32 g_idx."""
    groups = in_features // (in_features if group_size == -1 else group_size)
    return (
        in_features * out_features * bits // 8
        + groups * out_features * bits // 8
        + groups * out_features * 2
        + in_features * 4
    )


def protection_cost_bytes(
    linears: list[Any], modules: list[str], bits: int, group_size: int, protect_bits: int = 8
) -> int:
    """Extra bytes of keeping ``modules`` at ``protect_bits`` instead of ``bits``."""
    wanted = set(modules)
    return sum(
        gptq_layer_bytes(s.in_features, s.out_features, protect_bits, group_size)
        - gptq_layer_bytes(s.in_features, s.out_features, bits, group_size)
        for s in linears
        if s.name in wanted
    )


def quantized_weight_bytes(model_dir: Path) -> int:
    """Bytes of the quantized tensors (qweight, qzeros, scales, g_idx) of a checkpoint."""
    from rslora_deploy.quantizers._checkpoint import tensor_shapes

    sizes = {"I32": 4, "F16": 2, "BF16": 2, "F32": 4, "I8": 1, "U8": 1}
    total = 0
    for key, (shape, dtype) in tensor_shapes(model_dir).items():
        if key.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"):
            total += int(np.prod(shape)) * sizes.get(dtype, 4)
    return total
