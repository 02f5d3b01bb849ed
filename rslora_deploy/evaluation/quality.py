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
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from rslora_deploy.errors import InputError, RsloraDeployError
from rslora_deploy.evaluation.sequence import EvalText, LogitFn, SurvivalSpec, evaluate_sequence

logger = logging.getLogger(__name__)

#: The build's gate between the ONNX int4 model and the PyTorch quantized model it came from,
#: when the export does not state its own (stack-notes measured 0.006-0.014 for the
#: onnxruntime-genai builder at accuracy level 1 with a float lm_head on SmolLM2). An export
#: states its layout's limit as ``parity_tolerance`` (exporters/genai/layout.py: level 4 and
#: an int4 lm_head are correct exports with larger differences).
ONNX_LOGIT_ERROR_LIMIT = 0.02


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
    """Load a causal LM in fp32 (no remote code).

    GPTQ v1 checkpoints (what the quantize stage writes, GPTQ and RTN alike) are evaluated as
    their exact dequantization in fp32 (:func:`dequantized_gptq_model`): per window that is 2.2x
    less CPU time than gptqmodel's CPU kernel (12.3 vs 27.1 CPU s on SmolLM2, 512 tokens,
    docs/benchmarks.md), independent of the kernel's bf16 activations, and it honours
    per-module ``dynamic`` bits, which transformers' GPTQ path (optimum 2.3.0) ignores. Other
    quantized checkpoints (AWQ, GPTQ v2) load through transformers' integration.

    Raises:
        InputError: transformers cannot load the directory.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from rslora_deploy.quantizers.checkpoint import quantization_config

    qcfg = quantization_config(Path(model_dir)) or {}
    gptq_v1 = str(qcfg.get("checkpoint_format", qcfg.get("format", "gptq"))) == "gptq"
    if qcfg and str(qcfg.get("quant_method", "gptq")) == "gptq" and gptq_v1:
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
    no bf16 rounding of activations, unlike gptqmodel's CPU kernels. Tensors are read and
    dequantized one layer at a time straight into the model's parameters (built without random
    initialisation), so loading costs the fp32 model and one layer, not two copies of it.

    Raises:
        InputError: the checkpoint's tensors do not fit the model its config describes.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = model.state_dict()
    filled: set[str] = set()
    unexpected: list[str] = []
    for name, value in _gptq_state(Path(model_dir)):
        if name not in params:
            unexpected.append(name)
            continue
        with torch.no_grad():
            params[name].copy_(torch.from_numpy(value))
        filled.add(name)
    missing = [k for k in params if k not in filled and not k.endswith("lm_head.weight")]
    if unexpected or missing:
        raise InputError(
            f"{model_dir}: checkpoint tensors do not fit the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    return model.eval()


def _gptq_state(model_dir: Path) -> Any:
    """Yield ``(state-dict name, float32 array)``: GPTQ layers dequantized, the rest as stored."""
    import contextlib

    import torch
    from safetensors import safe_open

    from rslora_deploy.quantizers import rtn_math
    from rslora_deploy.quantizers.checkpoint import weight_files

    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(safe_open(p, framework="pt")) for p in weight_files(model_dir)]
        where = {key: handle for handle in files for key in handle.keys()}  # noqa: SIM118

        def get(key: str) -> np.ndarray:
            tensor = where[key].get_tensor(key)
            return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()

        for key in where:
            if key.endswith(".qweight"):
                layer = key[: -len(".qweight")]
                g_idx = get(f"{layer}.g_idx")
                packed = rtn_math.PackedGPTQ(
                    get(key), get(f"{layer}.qzeros"), get(f"{layer}.scales"), g_idx
                )
                bits = 32 * packed.qweight.shape[0] // len(g_idx)
                yield f"{layer}.weight", rtn_math.dequantize_gptq(packed, bits)
            elif not key.endswith((".qzeros", ".scales", ".g_idx")):
                yield key, np.ascontiguousarray(get(key), dtype=np.float32)


def onnx_logits(onnx_dir: Path, extra_inputs: dict[str, np.ndarray] | None = None) -> LogitFn:
    """A logit function for an onnxruntime-genai folder, run with plain onnxruntime.

    The genai ``Generator`` only exposes the last position's logits; perplexity needs all of
    them, so ``model.onnx`` is run once per window with empty past key/value inputs (shape
    ``[1, kv_heads, 0, head_dim]``), which is exactly the prompt-processing call genai makes.
    ``extra_inputs`` are fed on every call (a run-time adapter's LoRA inputs).
    """
    import onnxruntime as ort

    from rslora_deploy.last_token_logits import (
        full_logits_graph,
        session_from_bytes,
    )

    path = Path(onnx_dir) / "model.onnx"
    if not path.is_file():
        raise InputError(f"{path} not found; pass an onnxruntime-genai model folder")
    if _windowed_kv_cache(Path(onnx_dir)):
        return genai_logits(Path(onnx_dir))
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
        feed: dict[str, np.ndarray] = {"input_ids": ids[None, :], **past, **(extra_inputs or {})}
        if "attention_mask" in names:
            feed["attention_mask"] = np.ones((1, len(ids)), dtype=np.int64)
        if "position_ids" in names:
            feed["position_ids"] = np.arange(len(ids), dtype=np.int64)[None, :]
        logits = session.run(["logits"], feed)[0]
        return np.asarray(logits[0], dtype=np.float32)

    return run


def _windowed_kv_cache(onnx_dir: Path) -> bool:
    """True for a folder whose sliding-window layers keep a ring-buffer KV cache.

    The builder writes one by default for Gemma-3 (``sliding_window`` in genai_config.json): its
    past inputs have a fixed capacity the runtime manages, so a plain session with empty past
    inputs fails (``KV cache capacity (0) must be at least local_window_size``). Our exports
    turn it off (``windowed_kv_cache=false``, exporters/genai/layout.py); the builder's own do not.
    """
    import json

    config = json.loads((onnx_dir / "genai_config.json").read_text(encoding="utf-8"))
    return bool(config.get("model", {}).get("decoder", {}).get("sliding_window"))


def genai_logits(onnx_dir: Path) -> LogitFn:
    """A logit function run by onnxruntime-genai itself, one fresh generator per window.

    For graphs only the runtime can feed (a windowed KV cache). ``append_tokens`` runs the
    window's prompt-processing call; its ``logits`` output holds every position when the graph
    returns them all, which the builder's default graph does.

    Raises:
        InputError: the graph returns the last position only (perplexity needs every one).
    """
    import onnxruntime_genai as og

    model = og.Model(str(onnx_dir))

    def run(ids: np.ndarray) -> np.ndarray:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 1)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        logits = np.asarray(generator.get_output("logits"), dtype=np.float32)[0]
        if logits.shape[0] != len(ids):
            raise InputError(
                f"{onnx_dir}: the graph returns logits for {logits.shape[0]} of {len(ids)} "
                "positions; perplexity needs a graph that returns every position"
            )
        return logits

    return run


def _genai_head_size(onnx_dir: Path) -> int:
    import json

    data = json.loads((onnx_dir / "genai_config.json").read_text(encoding="utf-8"))
    return int(data["model"]["decoder"]["head_size"])


def run_lockstep(
    models: dict[str, LogitFn],
    text: EvalText,
    reference: str | None,
    pairs: list[tuple[str, str]],
    survival: Sequence[SurvivalSpec] = (),
) -> dict[str, Any]:
    """Evaluate logit functions that are already in memory (see :func:`evaluate_sequence`).

    For models that should not all sit in memory at once, pass loaders to
    :func:`~rslora_deploy.evaluation.sequence.evaluate_sequence` instead.
    """
    loaders = {name: (lambda fn=fn: fn) for name, fn in models.items()}
    return evaluate_sequence(loaders, text, reference, pairs, survival)


def relative_logit_error(
    onnx_dir: Path, torch_quantized_dir: Path, windows: int = 4, window_len: int = 512
) -> float:
    """Relative L2 error of the ONNX model's logits against the PyTorch quantized model's.

    ``||L_onnx - L_torch||_F / ||L_torch||_F`` over ``windows`` evaluation windows.
    """
    tokenizer = _tokenizer(torch_quantized_dir)
    text = eval_windows(tokenizer, windows, window_len)
    loaders = {
        "torch": partial(torch_logits, torch_quantized_dir),
        "onnx": partial(onnx_logits, onnx_dir),
    }
    result = evaluate_sequence(loaders, text, None, [("onnx", "torch")])
    return float(result["relative_logit_error"]["onnx_vs_torch"])


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)


def evaluate_build(
    merged_dir: Path,
    quantized_dir: Path | None,
    onnx_dir: Path | None,
    eval_cfg: Any,
    base_dir: Path | None = None,
    *,
    survival_threshold: float = 0.5,
    survival_genre: str | None = None,
    onnx_tolerance: float | None = None,
) -> dict[str, Any]:
    """Evaluate a build: perplexity of merged / quantized / ONNX, agreement, logit error, survival.

    The models are evaluated one at a time (:func:`evaluate_sequence`): merged, quantized, base,
    then ONNX; each is loaded once and released before the next.

    Args:
        merged_dir: merged full-precision HF directory (the reference).
        quantized_dir: GPTQ/AWQ checkpoint of the quantize stage (None: compare only the ONNX
            model with the reference, e.g. any ONNX folder against its source model).
        onnx_dir: onnxruntime-genai folder of the export stage (None skips the ONNX model).
        eval_cfg: :class:`rslora_deploy.config.EvalConfig` (windows, window_len).
        base_dir: the base model before merging; when given, adapter survival is reported.
        survival_threshold: warn when the retained fraction of the adapter effect is lower.
        survival_genre: Brown genre of the adapter's own domain (e.g. ``government``); the
            survival statistics then use a second set of windows from that genre only.
        onnx_tolerance: the export's own ONNX-vs-PyTorch parity limit (its layout's
            ``parity_tolerance``); None uses :data:`ONNX_LOGIT_ERROR_LIMIT`.

    Returns:
        JSON-able dict: protocol, per-model perplexity / agreement, relative logit errors,
        ``onnx_vs_torch_ok`` (with both a quantized and an ONNX model) and (with ``base_dir``)
        ``survival``.

    Raises:
        InputError: neither a quantized nor an ONNX model was given.
    """
    if quantized_dir is None and onnx_dir is None:
        raise InputError("nothing to compare with the reference; pass a quantized or ONNX model")
    start = time.perf_counter()
    tokenizer = _tokenizer(merged_dir)
    text = eval_windows(tokenizer, eval_cfg.windows, eval_cfg.window_len)
    loaders = {"merged": partial(torch_logits, merged_dir)}
    pairs: list[tuple[str, str]] = []
    if quantized_dir is not None:
        loaders["quantized"] = partial(torch_logits, quantized_dir)
        pairs.append(("quantized", "merged"))
    if base_dir is not None:
        loaders["base"] = partial(torch_logits, base_dir)
    if onnx_dir is not None:
        loaders["onnx"] = partial(onnx_logits, onnx_dir)
        if quantized_dir is not None:
            pairs.append(("onnx", "quantized"))
        pairs.append(("onnx", "merged"))
    # Survival is measured on the shipped model when there is one: the ONNX graph is what the
    # device runs, and on CPU it is 3-4x faster per window than gptqmodel's PyTorch kernel.
    survivor = "onnx" if onnx_dir is not None else "quantized"
    specs: list[SurvivalSpec] = []
    if base_dir is not None:
        domain = None
        if survival_genre is not None:
            # The adapter's own domain: B, M, Q again on windows of that genre only.
            domain = eval_windows(tokenizer, eval_cfg.windows, eval_cfg.window_len, survival_genre)
        specs.append(SurvivalSpec("base", "merged", survivor, domain))
    result = evaluate_sequence(loaders, text, "merged", pairs, specs)
    report: dict[str, Any] = {
        "protocol": {
            **text.meta,
            "scored_tokens": text.scored_tokens,
            "perplexity": "exp(mean NLL), BOS per window, non-overlapping windows",
        },
        **result,
    }
    if onnx_dir is not None and quantized_dir is not None:
        limit = ONNX_LOGIT_ERROR_LIMIT if onnx_tolerance is None else onnx_tolerance
        report.update(_onnx_gate(result["relative_logit_error"]["onnx_vs_quantized"], limit))
    if specs:
        if specs[0].text is not None:
            domain_text = specs[0].text
            report["survival_protocol"] = {
                **domain_text.meta,
                "scored_tokens": domain_text.scored_tokens,
            }
        report["survival"] = {
            **specs[0].stats.summary(threshold=survival_threshold),
            "quantized_model": survivor,
        }
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def _onnx_gate(error: float, limit: float) -> dict[str, Any]:
    """The export's parity check: ONNX int4 logits against the PyTorch quantized model's."""
    if error >= limit:
        logger.warning(
            "ONNX logits differ from the PyTorch quantized model by %.4f (limit %.2f)", error, limit
        )
    return {"onnx_vs_torch_ok": error < limit, "onnx_vs_torch_limit": limit}


def evaluate_models(
    model_dirs: dict[str, Path],
    reference: str,
    windows: int,
    window_len: int,
    onnx_dirs: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Perplexity and agreement of several HF (and ONNX) models on the same windows.

    The models are loaded one at a time (:func:`evaluate_sequence`).
    """
    if reference not in model_dirs:
        raise RsloraDeployError(f"reference model {reference!r} is not among {list(model_dirs)}")
    text = eval_windows(_tokenizer(model_dirs[reference]), windows, window_len)
    loaders: dict[str, Any] = {n: partial(torch_logits, path) for n, path in model_dirs.items()}
    for name, path in (onnx_dirs or {}).items():
        loaders[name] = partial(onnx_logits, path)
    result = evaluate_sequence(loaders, text, reference, [])
    return {"protocol": {**text.meta, "scored_tokens": text.scored_tokens}, **result}
