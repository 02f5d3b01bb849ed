"""Quality evaluation: perplexity, greedy agreement and ONNX-vs-PyTorch logit error.

Protocol (fixed so numbers are comparable across builds and docs/benchmarks-quantize.md):

* Text: the evaluation split of the fetched Brown corpus (disjoint from calibration), documents in
  file order, tokenized without special tokens and joined with the EOS token.
* Windows: the first ``windows`` non-overlapping chunks of ``window_len - 1`` tokens, each
  prefixed with BOS (when the tokenizer has one): every window is scored from a fresh context.
* Perplexity: ``exp(mean NLL)`` over the ``window_len - 1`` predicted tokens of every window
  (the BOS position predicts token 1; nothing predicts BOS), so the stated token count is
  ``windows * (window_len - 1)``.
* Greedy agreement: the fraction of those positions where ``argmax`` of a model's logits equals
  ``argmax`` of the full-precision model's.
* Relative logit error: ``||L_a - L_b||_F / ||L_b||_F`` over all positions of all windows.

All models run in lockstep over the same windows, one window at a time, so memory holds one
``[window_len, vocab]`` logit matrix per model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rslora_deploy.errors import InputError, RsloraDeployError
from rslora_deploy.evaluation.metrics import log_softmax, target_nll

logger = logging.getLogger(__name__)

#: The build's gate between the ONNX int4 model and the PyTorch quantized model it came from
#: (stack-notes measured 0.006-0.014 for the onnxruntime-genai builder on SmolLM2).
ONNX_LOGIT_ERROR_LIMIT = 0.02

LogitFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class EvalText:
    """The tokenized evaluation windows.

    Attributes:
        input_ids: int64 ``[windows, window_len]``.
        scored_tokens: tokens whose prediction is scored (``windows * (window_len - 1)``).
        meta: source, split, windows, window_len, bos.
    """

    input_ids: np.ndarray
    scored_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)


def eval_windows(
    tokenizer: Any, windows: int, window_len: int, genre: str | None = None
) -> EvalText:
    """Build the evaluation windows from the Brown evaluation split (see the module docstring).

    Raises:
        InputError: the split holds fewer tokens than ``windows`` windows need.
    """
    from rslora_deploy.data.corpus import iter_documents

    docs = [d.text for d in iter_documents("evaluation", genre=genre)]
    source = f"brown:evaluation:{genre or 'all'}"
    return windows_from_texts(tokenizer, docs, windows, window_len, source)


def windows_from_texts(
    tokenizer: Any, docs: list[str], windows: int, window_len: int, source: str
) -> EvalText:
    """Cut documents into BOS-prefixed, non-overlapping windows (the first ``windows`` of them)."""
    bos = tokenizer.bos_token_id
    sep = tokenizer.eos_token_id
    stream: list[int] = []
    body = window_len - 1 if bos is not None else window_len
    for doc in docs:
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if sep is not None:
            stream.append(sep)
        if len(stream) >= windows * body:
            break
    if len(stream) < windows * body:
        raise InputError(
            f"evaluation text from {source} has {len(stream)} tokens, fewer than {windows} "
            f"windows of {window_len}; lower eval.windows or eval.window_len"
        )
    rows: np.ndarray = np.asarray(stream[: windows * body], dtype=np.int64).reshape(windows, body)
    if bos is not None:
        rows = np.concatenate([np.full((windows, 1), bos, dtype=np.int64), rows], axis=1)
    meta = {"source": source, "windows": windows, "window_len": window_len, "bos": bos is not None}
    return EvalText(rows, windows * (window_len - 1), meta)


def torch_logits(model_dir: Path) -> LogitFn:
    """A logit function for a Hugging Face model dir (full precision, GPTQ or AWQ)."""
    import torch

    from rslora_deploy.backend import select_backend

    backend = select_backend()
    model = load_torch_model(model_dir).to(backend.device).eval()

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(ids[None, :]).to(backend.device)).logits[0]
        return out.float().cpu().numpy()

    return run


def load_torch_model(model_dir: Path) -> Any:
    """Load a causal LM with transformers (fp32 compute for unquantized parts, no remote code).

    Quantized checkpoints load through transformers' GPTQ/AWQ integration (gptqmodel kernels).

    Raises:
        InputError: transformers cannot load the directory.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from rslora_deploy.quantizers.checkpoint import quantization_config

    qcfg = quantization_config(Path(model_dir)) or {}
    if qcfg.get("dynamic") and str(qcfg.get("quant_method", "gptq")) == "gptq":
        # optimum 2.3.0 (transformers' GPTQ path) ignores per-module `dynamic` bits and
        # reinitialises mismatched layers: evaluate such checkpoints by exact dequantization.
        return dequantized_gptq_model(Path(model_dir))
    try:
        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, trust_remote_code=False
        )
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        raise InputError(
            f"cannot load {model_dir} with transformers ({type(exc).__name__}: {str(exc)[:200]}); "
            "pass a Hugging Face model directory (install optimum + gptqmodel for GPTQ/AWQ)"
        ) from exc


def dequantized_gptq_model(model_dir: Path) -> Any:
    """An fp32 model whose linears are the exact dequantization of a GPTQ v1 checkpoint.

    Each layer's bits follow from its tensors (``32 * qweight.shape[0] / len(g_idx)``), so
    per-module ``dynamic`` overrides (``--protect-adapter``) are honoured. Kernel-independent:
    no bf16 rounding of activations, unlike gptqmodel's CPU kernels.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rslora_deploy.quantizers import rtn_math
    from rslora_deploy.quantizers.checkpoint import load_tensors

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_tensors(model_dir)
    state: dict[str, Any] = {}
    for key, value in tensors.items():
        if key.endswith(".qweight"):
            layer = key[: -len(".qweight")]
            g_idx = tensors[f"{layer}.g_idx"]
            bits = 32 * value.shape[0] // len(g_idx)
            packed = rtn_math.PackedGPTQ(
                value, tensors[f"{layer}.qzeros"], tensors[f"{layer}.scales"], g_idx
            )
            state[f"{layer}.weight"] = torch.from_numpy(rtn_math.dequantize_gptq(packed, bits))
        elif not key.endswith((".qzeros", ".scales", ".g_idx")):
            state[key] = torch.from_numpy(np.ascontiguousarray(value)).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
        raise InputError(
            f"{model_dir}: checkpoint tensors do not fit the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    return model.eval()


def onnx_logits(onnx_dir: Path) -> LogitFn:
    """A logit function for an onnxruntime-genai folder, run with plain onnxruntime.

    The genai ``Generator`` only exposes the last position's logits; perplexity needs all of
    them, so ``model.onnx`` is run once per window with empty past key/value inputs (shape
    ``[1, kv_heads, 0, head_dim]``), which is exactly the prompt-processing call genai makes.
    """
    import onnxruntime as ort

    from rslora_deploy.last_token_logits import (
        full_logits_graph,
        session_from_bytes,
    )

    path = Path(onnx_dir) / "model.onnx"
    if not path.is_file():
        raise InputError(f"{path} not found; pass an onnxruntime-genai model folder")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    # A shipped last-token graph returns one position; perplexity reads every position from the
    # same weights through an in-memory full-logits graph (rslora_deploy/last_token_logits.py).
    full = full_logits_graph(Path(onnx_dir))
    if full is None:
        session = ort.InferenceSession(str(path), options, providers=providers)
    else:
        session = session_from_bytes(full, Path(onnx_dir), options, providers)
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    past = {}
    for item in session.get_inputs():
        if item.name.startswith("past_key_values"):
            kv_heads, head_dim = item.shape[1], item.shape[3]
            if not isinstance(head_dim, int):
                head_dim = _genai_head_size(Path(onnx_dir))
            past[item.name] = np.zeros((1, kv_heads, 0, head_dim), dtype=dtypes[item.type])
    names = {i.name for i in session.get_inputs()}

    def run(ids: np.ndarray) -> np.ndarray:
        feed: dict[str, np.ndarray] = {"input_ids": ids[None, :], **past}
        if "attention_mask" in names:
            feed["attention_mask"] = np.ones((1, len(ids)), dtype=np.int64)
        if "position_ids" in names:
            feed["position_ids"] = np.arange(len(ids), dtype=np.int64)[None, :]
        logits = session.run(["logits"], feed)[0]
        return np.asarray(logits[0], dtype=np.float32)

    return run


def _genai_head_size(onnx_dir: Path) -> int:
    import json

    data = json.loads((onnx_dir / "genai_config.json").read_text(encoding="utf-8"))
    return int(data["model"]["decoder"]["head_size"])


@dataclass
class _Acc:
    nll: float = 0.0
    count: int = 0
    agree: int = 0


def run_lockstep(
    models: dict[str, LogitFn],
    text: EvalText,
    reference: str | None,
    pairs: list[tuple[str, str]],
    on_window: Callable[[dict[str, np.ndarray], np.ndarray], None] | None = None,
) -> dict[str, Any]:
    """Run every model on every window; accumulate NLL, agreement and pairwise logit error.

    Args:
        models: name -> logit function.
        text: the windows.
        reference: the model greedy agreement is measured against (None: no agreement).
        pairs: ``(a, b)`` pairs for ``relative_logit_error(a vs b)``.
        on_window: called with each window's logits and token ids (survival statistics hook).
    """
    accs = {name: _Acc() for name in models}
    diff2 = dict.fromkeys(pairs, 0.0)
    ref2 = dict.fromkeys(pairs, 0.0)
    seconds = dict.fromkeys(models, 0.0)
    for ids in text.input_ids:
        logits: dict[str, np.ndarray] = {}
        for name, fn in models.items():
            start = time.perf_counter()
            logits[name] = fn(ids)
            seconds[name] += time.perf_counter() - start
            logp = log_softmax(logits[name][:-1])
            accs[name].nll += target_nll(logp, ids[1:])
            accs[name].count += len(ids) - 1
        if reference is not None:
            ref_arg = logits[reference][:-1].argmax(-1)
            for name in models:
                accs[name].agree += int((logits[name][:-1].argmax(-1) == ref_arg).sum())
        for a, b in pairs:
            diff2[(a, b)] += float(np.square(logits[a] - logits[b], dtype=np.float64).sum())
            ref2[(a, b)] += float(np.square(logits[b], dtype=np.float64).sum())
        if on_window is not None:
            on_window(logits, ids)
    result: dict[str, Any] = {"models": {}}
    for name, acc in accs.items():
        entry = {
            "perplexity": math.exp(acc.nll / acc.count),
            "mean_nll": acc.nll / acc.count,
            "seconds": round(seconds[name], 2),
        }
        if reference is not None:
            entry["greedy_agreement"] = acc.agree / acc.count
        result["models"][name] = entry
    result["relative_logit_error"] = {
        f"{a}_vs_{b}": math.sqrt(diff2[(a, b)] / ref2[(a, b)]) for a, b in pairs
    }
    return result


def relative_logit_error(
    onnx_dir: Path, torch_quantized_dir: Path, windows: int = 4, window_len: int = 512
) -> float:
    """Relative L2 error of the ONNX model's logits against the PyTorch quantized model's.

    ``||L_onnx - L_torch||_F / ||L_torch||_F`` over ``windows`` evaluation windows.
    """
    tokenizer = _tokenizer(torch_quantized_dir)
    text = eval_windows(tokenizer, windows, window_len)
    models = {"onnx": onnx_logits(onnx_dir), "torch": torch_logits(torch_quantized_dir)}
    result = run_lockstep(models, text, None, [("onnx", "torch")])
    return float(result["relative_logit_error"]["onnx_vs_torch"])


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)


def evaluate_build(
    merged_dir: Path,
    quantized_dir: Path,
    onnx_dir: Path | None,
    eval_cfg: Any,
    base_dir: Path | None = None,
    *,
    survival_threshold: float = 0.5,
    survival_genre: str | None = None,
) -> dict[str, Any]:
    """Evaluate a build: perplexity of merged / quantized / ONNX, agreement, logit error, survival.

    Args:
        merged_dir: merged full-precision HF directory (the reference).
        quantized_dir: GPTQ/AWQ checkpoint of the quantize stage.
        onnx_dir: onnxruntime-genai folder of the export stage (None skips the ONNX model).
        eval_cfg: :class:`rslora_deploy.config.EvalConfig` (windows, window_len).
        base_dir: the base model before merging; when given, adapter survival is reported.
        survival_threshold: warn when the retained fraction of the adapter effect is lower.
        survival_genre: Brown genre of the adapter's own domain (e.g. ``government``); the
            survival statistics then use a second set of windows from that genre only.

    Returns:
        JSON-able dict: protocol, per-model perplexity / agreement, relative logit errors,
        ``onnx_vs_torch_ok`` and (with ``base_dir``) ``survival``.
    """
    from rslora_deploy.evaluation import survival

    start = time.perf_counter()
    tokenizer = _tokenizer(merged_dir)
    text = eval_windows(tokenizer, eval_cfg.windows, eval_cfg.window_len)
    models: dict[str, LogitFn] = {
        "merged": torch_logits(merged_dir),
        "quantized": torch_logits(quantized_dir),
    }
    pairs = [("quantized", "merged")]
    if onnx_dir is not None:
        models["onnx"] = onnx_logits(onnx_dir)
        pairs += [("onnx", "quantized"), ("onnx", "merged")]
    stats = None
    if base_dir is not None:
        models["base"] = torch_logits(base_dir)
        stats = survival.SurvivalStats()

    # Survival is measured on the shipped model when there is one: the ONNX graph is what the
    # device runs, and on CPU it is 3-4x faster per window than gptqmodel's PyTorch kernel.
    survivor = "onnx" if onnx_dir is not None else "quantized"

    def hook_for(acc: Any) -> Callable[[dict[str, np.ndarray], np.ndarray], None]:
        return lambda lg, ids: acc.add(
            lg["base"], lg["merged"], lg[survivor], ignore_last=True, targets=ids[1:]
        )

    main_hook = hook_for(stats) if stats is not None and survival_genre is None else None
    result = run_lockstep(models, text, "merged", pairs, main_hook)
    report: dict[str, Any] = {
        "protocol": {
            **text.meta,
            "scored_tokens": text.scored_tokens,
            "perplexity": "exp(mean NLL), BOS per window, non-overlapping windows",
        },
        **result,
    }
    if onnx_dir is not None:
        err = result["relative_logit_error"]["onnx_vs_quantized"]
        report["onnx_vs_torch_ok"] = err < ONNX_LOGIT_ERROR_LIMIT
        report["onnx_vs_torch_limit"] = ONNX_LOGIT_ERROR_LIMIT
        if err >= ONNX_LOGIT_ERROR_LIMIT:
            logger.warning(
                "ONNX logits differ from the PyTorch quantized model by %.4f (limit %.2f)",
                err,
                ONNX_LOGIT_ERROR_LIMIT,
            )
    if stats is not None and survival_genre is not None:
        # The adapter's own domain: B, M, Q again on windows of that genre only.
        stats = survival.SurvivalStats()
        domain = eval_windows(tokenizer, eval_cfg.windows, eval_cfg.window_len, survival_genre)
        trio = {k: models[k] for k in ("base", "merged", survivor)}
        run_lockstep(trio, domain, None, [], hook_for(stats))
        report["survival_protocol"] = {**domain.meta, "scored_tokens": domain.scored_tokens}
    if stats is not None:
        report["survival"] = {
            **stats.summary(threshold=survival_threshold),
            "quantized_model": survivor,
        }
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def evaluate_models(
    model_dirs: dict[str, Path],
    reference: str,
    windows: int,
    window_len: int,
    onnx_dirs: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Perplexity and agreement of several HF (and ONNX) models on the same windows."""
    if reference not in model_dirs:
        raise RsloraDeployError(f"reference model {reference!r} is not among {list(model_dirs)}")
    text = eval_windows(_tokenizer(model_dirs[reference]), windows, window_len)
    models = {name: torch_logits(path) for name, path in model_dirs.items()}
    for name, path in (onnx_dirs or {}).items():
        models[name] = onnx_logits(path)
    result = run_lockstep(models, text, reference, [])
    return {"protocol": {**text.meta, "scored_tokens": text.scored_tokens}, **result}
