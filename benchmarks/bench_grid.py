"""Which grid: group size, symmetry and lm_head precision, by quality alone, without an export.

The export is the slow part of a layout comparison on a shared 2-core machine; the quality of a
grid does not need it (the ONNX graph at ``accuracy_level`` 1 reproduces the dequantized weights
to ~0.01 relative logit error, docs/export.md). This script loads the full-precision model once
and, for each variant, swaps in the RTN-dequantized weights of one part of the model:

* ``layers_g{32,64,128}_{sym,asym}``: every decoder linear at int4 RTN, lm_head in fp32 (group
  sizes that do not divide every layer width are skipped, as the build refuses them);
* ``head_int4_g{32,64}_{sym,asym}``, ``head_int8_g32_sym``: only the (tied) lm_head/embedding
  table quantized, the layers in fp32: what each lm_head precision costs by itself.

and reports perplexity, greedy agreement and relative logit error against the full-precision
model on ``--windows`` x 512 Brown evaluation tokens. RTN is the grid's own effect; how much GPTQ
recovers on top is in docs/benchmarks-quantize.md.

Usage: nice -n 10 python benchmarks/bench_grid.py --model smollm2 [--windows 8]
Results: benchmarks/results/grid_<model>.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe  # noqa: E402
from bench_vs_builder import RESULTS, source_model  # noqa: E402


def grid_variants(widths: set[int]) -> dict[str, tuple[str, int, int, bool]]:
    """Name -> (part, bits, group, sym) for every variant of the run."""
    out: dict[str, tuple[str, int, int, bool]] = {}
    for group in (32, 64, 128):
        if all(w % group == 0 for w in widths):
            for sym in (True, False):
                out[f"layers_g{group}_{'sym' if sym else 'asym'}"] = ("layers", 4, group, sym)
    for group in (32, 64):
        for sym in (True, False):
            out[f"head_int4_g{group}_{'sym' if sym else 'asym'}"] = ("head", 4, group, sym)
    out["head_int8_g32_sym"] = ("head", 8, 32, True)
    return out


def _rtn(weight: Any, bits: int, group: int, sym: bool) -> Any:
    import torch

    from rslora_deploy.quantizers import rtn_math

    gq = rtn_math.quantize_rtn(weight.detach().float().numpy(), bits, group, sym)
    return torch.from_numpy(rtn_math.dequantize(gq))


def _score(model: Any, windows: np.ndarray, refs: list[np.ndarray]) -> dict[str, float]:
    import torch

    from rslora_deploy.evaluation.metrics import log_softmax

    nll, count, agree, diff2, ref2 = 0.0, 0, 0, 0.0, 0.0
    for ids, ref in zip(windows, refs, strict=True):
        with torch.inference_mode():
            logits = model(torch.from_numpy(ids[None, :])).logits[0].float().numpy()
        logp = log_softmax(logits[:-1])
        nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
        agree += int((logits[:-1].argmax(-1) == ref[:-1].argmax(-1)).sum())
        diff2 += float(np.square(logits - ref, dtype=np.float64).sum())
        ref2 += float(np.square(ref, dtype=np.float64).sum())
    return {
        "perplexity": round(math.exp(nll / count), 3),
        "greedy_agreement": round(agree / count, 4),
        "relative_logit_error": round(math.sqrt(diff2 / ref2), 4),
    }


def run(model_name: str, windows: int) -> dict[str, Any]:
    """Score every grid variant of ``model_name``."""
    import torch

    from rslora_deploy.evaluation.quality import _tokenizer, eval_windows, load_torch_model
    from rslora_deploy.quantizers.checkpoint import decoder_linears

    source = source_model(model_name, Path(f"/tmp/bench-grid-{model_name}"))
    model = load_torch_model(source).eval()
    text = eval_windows(_tokenizer(source), windows, 512)
    linears = decoder_linears(source)
    modules = dict(model.named_modules())
    originals = {s.name: modules[s.name].weight.data.clone() for s in linears}
    head = model.get_output_embeddings()
    head_original = head.weight.data.clone()
    with torch.inference_mode():
        refs = [model(torch.from_numpy(ids[None, :])).logits[0].float().numpy()
                for ids in text.input_ids]  # fmt: skip
    results = {"full_precision": _score(model, text.input_ids, refs)}
    for name, (part, bits, group, sym) in grid_variants({s.in_features for s in linears}).items():
        if part == "layers":
            for spec in linears:
                modules[spec.name].weight.data = _rtn(originals[spec.name], bits, group, sym)
        else:
            # Tied: the embedding shares this tensor, as the builder's shared table does.
            head.weight.data.copy_(_rtn(head_original, bits, group, sym))
        results[name] = _score(model, text.input_ids, refs)
        for spec in linears:
            modules[spec.name].weight.data = originals[spec.name]
        head.weight.data.copy_(head_original)
    return {
        "model": model_name,
        "machine": describe(),
        "protocol": f"Brown evaluation split, {windows} x 512 tokens, BOS per window; RTN "
        "(rslora_deploy.quantizers.rtn_math, fp16 scales) applied in PyTorch, fp32 compute",
        "tied_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        "results": results,
    }


def main() -> None:
    """Command line entry."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args()
    report = run(args.model, args.windows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"grid_{args.model}.json").write_text(json.dumps(report, indent=2) + "\n")
    print("| variant | perplexity | greedy agreement | relative logit error |")  # noqa: T201
    print("|---|---|---|---|")  # noqa: T201
    for name, e in report["results"].items():
        row = f"| {name} | {e['perplexity']} | {e['greedy_agreement']} | "
        print(row + f"{e['relative_logit_error']} |")  # noqa: T201


if __name__ == "__main__":
    main()
