"""Adapter survival of the demo adapter, with and without --protect-adapter, and the size cost.

Merges the embedded demo adapter (task ``brown-government``) into SmolLM2-135M, quantizes it
with each variant, and measures on windows of the adapter's own domain (Brown genre
``government``, evaluation split) the survival statistics of
:mod:`rslora_deploy.evaluation.survival` for every variant against the same base and merged logits.
Results: benchmarks/results/survival.json.

Usage::

    GPTQMODEL_CPU_WORKERS=2 python benchmarks/bench_survival.py --merged /tmp/surv/merged \
        --work /tmp/surv --windows 8
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
log = logging.getLogger("bench")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--merged", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/surv"))
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--genre", default="government")
    parser.add_argument("--method", default="rtn")
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.15, 1.0])
    parser.add_argument(
        "--results", type=Path, default=Path(__file__).parent / "results" / "survival.json"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from rslora_deploy.artifact import Artifact
    from rslora_deploy.config import QuantizeConfig
    from rslora_deploy.data.assets import default_base_dir
    from rslora_deploy.evaluation.quality import _tokenizer, eval_windows, torch_logits
    from rslora_deploy.evaluation.sequence import SurvivalSpec, evaluate_sequence
    from rslora_deploy.exporters.genai.fused import FUSED_GROUPS
    from rslora_deploy.quantizers import protection
    from rslora_deploy.quantizers.base import QuantizeExtras
    from rslora_deploy.quantizers.checkpoint import decoder_linears
    from rslora_deploy.stages.quantize import quantize_model

    base = default_base_dir()
    cfg = QuantizeConfig(method=args.method, group_size=64, calib_samples=8, calib_seq_len=128)
    ratios = protection.delta_to_step_ratios(base, args.merged, cfg.bits, cfg.group_size, cfg.sym)
    linears = decoder_linears(args.merged)
    variants: dict[str, dict[str, Any]] = {}
    for ratio in [None, *args.ratios]:
        name = f"{args.method}" if ratio is None else f"{args.method}_protect{ratio}"
        modules = [] if ratio is None else protection.protected_modules(ratios, FUSED_GROUPS, ratio)
        dyn = (
            protection.protection_dynamic(ratios, FUSED_GROUPS, ratio)
            if ratio is not None
            else None
        )
        out = args.work / name
        if not (out / "config.json").is_file():
            start = time.perf_counter()
            quantize_model(
                Artifact("hf", args.merged), out, cfg, extras=QuantizeExtras(dynamic=dyn or None)
            )
            log.info("%s quantized in %.1f s", name, time.perf_counter() - start)
        variants[name] = {
            "protected_modules": len(modules),
            "predicted_extra_bytes": protection.protection_cost_bytes(
                linears, modules, cfg.bits, cfg.group_size
            ),
            "quantized_weight_bytes": protection.quantized_weight_bytes(out),
            "path": out,
        }
    text = eval_windows(_tokenizer(base), args.windows, 512, args.genre)
    # One model in memory at a time; the survival statistics read base and merged from the spill.
    loaders = {"base": partial(torch_logits, base), "merged": partial(torch_logits, args.merged)}
    loaders.update({n: partial(torch_logits, v["path"]) for n, v in variants.items()})
    specs = {n: SurvivalSpec("base", "merged", n) for n in variants}
    stats = {n: spec.stats for n, spec in specs.items()}
    result = evaluate_sequence(loaders, text, "merged", [], list(specs.values()))
    plain = variants[args.method]["quantized_weight_bytes"]
    report = {
        "protocol": {**text.meta, "scored_tokens": text.scored_tokens},
        "method": args.method,
        "group_size": cfg.group_size,
        "perplexity": result["models"],
        "ratio_percentiles": {},
        "variants": {},
    }
    values = sorted(r["ratio"] for r in ratios.values())
    for q in (0, 10, 50, 90, 100):
        report["ratio_percentiles"][q] = values[min(len(values) - 1, q * len(values) // 100)]
    for n, v in variants.items():
        report["variants"][n] = {
            **{k: val for k, val in v.items() if k != "path"},
            "measured_extra_bytes": v["quantized_weight_bytes"] - plain,
            "survival": stats[n].summary(),
        }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
