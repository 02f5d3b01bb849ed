"""Benchmark RTN / GPTQ / AWQ on SmolLM2-135M at group size 64, lm_head kept in fp32.

Each quantization runs in its own subprocess (so its peak RSS is its own: ``ru_maxrss`` of the
child), then all checkpoints are evaluated in lockstep on the same evaluation windows
(:mod:`rslora_deploy.evaluation` protocol). Results go to ``benchmarks/results/quantize.json``
after every step, so a run cut short still records what it measured.

Usage::

    GPTQMODEL_CPU_WORKERS=2 python benchmarks/bench_quantize.py --windows 16 \
        --variants rtn gptq gptq_mse gptq_desc awq --work /tmp/bench-q

``recovered`` = ``(ppl_rtn - ppl_method) / (ppl_rtn - ppl_fp)``: the fraction of RTN's perplexity
increase that the method wins back (1.0 = as good as full precision, 0 = no better than RTN).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
log = logging.getLogger("bench")

#: name -> (QuantizeConfig overrides, QuantizeExtras overrides)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "rtn": ({"method": "rtn"}, {}),
    "gptq": ({"method": "gptq", "calib_samples": 32, "calib_seq_len": 256}, {}),
    "gptq_small": ({"method": "gptq", "calib_samples": 8, "calib_seq_len": 128}, {}),
    "gptq_mse": ({"method": "gptq", "calib_samples": 32, "calib_seq_len": 256}, {"mse": 2.4}),
    "gptq_desc": (
        {"method": "gptq", "calib_samples": 32, "calib_seq_len": 256, "desc_act": True},
        {},
    ),
    "gptq_damp01": (
        {"method": "gptq", "calib_samples": 32, "calib_seq_len": 256, "damp_percent": 0.01},
        {},
    ),
    "gptq_nots": (
        {"method": "gptq", "calib_samples": 32, "calib_seq_len": 256},
        {"true_sequential": False},
    ),
    "awq": ({"method": "awq", "calib_samples": 16, "calib_seq_len": 256}, {}),
    "awq_small": ({"method": "awq", "calib_samples": 8, "calib_seq_len": 128}, {}),
}


def run_one(name: str, model_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Quantize one variant in this process (called in the child) and return its facts."""
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.config import QuantizeConfig
    from rslora_deploy.quantizers.base import QuantizeExtras
    from rslora_deploy.stages.quantize import quantize_model

    cfg_kw, extra_kw = VARIANTS[name]
    cfg = QuantizeConfig(group_size=64, **cfg_kw)
    start = time.perf_counter()
    art = quantize_model(Artifact("hf", model_dir), out_dir, cfg, extras=QuantizeExtras(**extra_kw))
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "variant": name,
        "wall_s": round(wall, 1),
        "engine_s": art.meta["seconds"],
        "peak_rss_mb": round(peak / 2**20),
        "meta": art.meta,
    }


def _machine() -> dict[str, Any]:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=["rtn", "gptq", "awq"])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-quantize"))
    parser.add_argument(
        "--results", type=Path, default=Path(__file__).parent / "results" / "quantize.json"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--skip-quantize", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from rslora_deploy.assets import default_base_dir

    base = default_base_dir()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, base, args.work / args.one)), flush=True)
        return
    args.results.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": _machine(),
        "model": "SmolLM2-135M-Instruct (fp32)",
        "group_size": 64,
        "lm_head": "fp32",
        "quantize": {},
    }
    if args.results.is_file():
        report = json.loads(args.results.read_text())
    for name in args.variants:
        out = args.work / name
        if args.skip_quantize and (out / "config.json").is_file():
            continue
        subprocess.run(["rm", "-rf", str(out)], check=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name, "--work", str(args.work)],
            capture_output=True,
            text=True,
            check=False,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            report["quantize"][name] = {"error": proc.stderr.strip().splitlines()[-1:]}
        else:
            report["quantize"][name] = json.loads(line[len("RESULT ") :])
        args.results.write_text(json.dumps(report, indent=2))
        log.info("%s: %s", name, report["quantize"][name].get("wall_s", "failed"))
    from rslora_deploy.evaluation import evaluate_models

    dirs = {"fp32": base}
    dirs.update(
        {n: args.work / n for n in report["quantize"] if (args.work / n / "config.json").is_file()}
    )
    result = evaluate_models(dirs, "fp32", args.windows, args.window_len)
    models = result["models"]
    ppl_fp = models["fp32"]["perplexity"]
    ppl_rtn = models.get("rtn", {}).get("perplexity")
    for name, entry in models.items():
        if ppl_rtn is not None and name != "fp32" and ppl_rtn != ppl_fp:
            entry["recovered_of_rtn_increase"] = (ppl_rtn - entry["perplexity"]) / (
                ppl_rtn - ppl_fp
            )
    report["eval"] = result
    args.results.write_text(json.dumps(report, indent=2))
    print(
        json.dumps(
            {
                n: {k: round(v, 4) if isinstance(v, float) else v for k, v in e.items()}
                for n, e in models.items()
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
