"""Peak RSS and time of the build's evaluate stage on a Qwen2-0.5B-shaped model (random weights).

Usage:
  python benchmarks/bench_eval_memory.py prepare [--dir out/bench-eval-0.5b]
  python benchmarks/bench_eval_memory.py run --label after [--dir ...] [--windows 8]
  python benchmarks/bench_eval_memory.py per-window --dir DIR   (CPU s of one window per runner)

No 0.5B model with real weights is available offline, so ``prepare`` builds one from Qwen2-0.5B's
shape (hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate 4864, vocab 151936, tied
embeddings) with transformers' default random initialisation, and writes what a build's evaluate
stage receives: ``base/`` (that model), ``merged/`` (q/v projections perturbed, standing in for
a merged adapter), ``quantized/`` (RTN int4 g64 of ``merged``, GPTQ format) and ``onnx/`` (the
onnxruntime-genai export of ``quantized`` for t4-2gb, viewed for the CPU). Text comes from
SmolLM2's tokenizer (its ids are all below Qwen2's vocabulary size). Perplexities of random
weights mean nothing: only time and memory are measured.

``run`` calls ``evaluate_build`` exactly as the build does (8 x 512 windows, adapter survival on
the government genre) in this process, samples the RSS of the process tree every 0.1 s
(``stages.base.measured``), and appends ``{label, wall s, cpu s, peak RSS, load average}`` to
``benchmarks/results/eval_memory.json``. Run it against another checkout's code with
``PYTHONPATH=<checkout>`` to compare versions on the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "eval_memory.json"
QWEN2_05B = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def prepare(root: Path) -> None:
    """Write base/, merged/, quantized/ and onnx/ under ``root`` (see the module docstring)."""
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.config import QuantizeConfig
    from rslora_deploy.exporters.genai.builder import cpu_view, export_onnx
    from rslora_deploy.exporters.genai.options import GenaiExportConfig
    from rslora_deploy.profiles import load_profile
    from rslora_deploy.stages.quantize import quantize_model

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "merged" / "config.json").is_file():  # steps already done are kept
        _write_models(root)
    quantized = Artifact("hf-quantized", root / "quantized")
    if not (root / "quantized" / "config.json").is_file():
        quantized = quantize_model(
            Artifact("hf", root / "merged"), root / "quantized", QuantizeConfig(method="rtn")
        )
    exported = export_onnx(
        quantized, root / "model", GenaiExportConfig(), load_profile("t4-2gb"), root / "export.log"
    )
    cpu_view(exported.path, root / "onnx")


def _write_models(root: Path) -> None:
    """base/ (random Qwen2-0.5B shape) and merged/ (its q/v projections perturbed)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rslora_deploy.data.assets import default_base_dir

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN2_05B), dtype=torch.float32)
    tokenizer_dir = default_base_dir()
    for name, perturb in (("base", 0.0), ("merged", 0.002)):
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
                    proj.weight.add_(torch.randn_like(proj.weight) * perturb)
        model.save_pretrained(root / name)
        for item in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(tokenizer_dir / item, root / name / item)


def run(root: Path, label: str, windows: int, note: str) -> dict[str, object]:
    """Evaluate the prepared models as the build does; return the measurement."""
    from rslora_deploy.config import EvalConfig
    from rslora_deploy.evaluation.quality import evaluate_build
    from rslora_deploy.stages.base import measured

    load = os.getloadavg()
    cpu0 = os.times()
    with measured("evaluate") as record:
        report = evaluate_build(
            root / "merged",
            root / "quantized",
            root / "onnx",
            EvalConfig(windows=windows),
            root / "base",
            survival_genre="government",
        )
    cpu1 = os.times()
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    return {
        "label": label,
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "model": note,
        "windows": f"{windows} x 512 (+ {windows} x 512 survival domain windows)",
        "wall_s": round(record.seconds, 1),
        "cpu_s": round(cpu, 1),
        "peak_rss_mib": round(record.peak_rss_bytes / 2**20),
        "load_average_before": [round(x, 1) for x in load],
        "load_average_after": [round(x, 1) for x in os.getloadavg()],
        "models": list(report["models"]),
        "machine": describe(),
    }


def per_window(root: Path) -> dict[str, object]:
    """Load time and CPU seconds of one 512-token window for each way a model is run."""
    import numpy as np

    from rslora_deploy.evaluation import quality

    ids = np.random.default_rng(0).integers(3, 49152, 512)
    ways = {
        "merged fp32 (transformers)": lambda: quality.torch_logits(root / "merged"),
        "GPTQ exact fp32 dequantization": lambda: quality.torch_logits(root / "quantized"),
        "GPTQ via transformers (gptqmodel kernel)": lambda: _transformers_logits(
            root / "quantized"
        ),
        "ONNX (onnxruntime)": lambda: quality.onnx_logits(root / "onnx"),
    }
    out: dict[str, object] = {"load_average": [round(x, 1) for x in os.getloadavg()]}
    for name, make in ways.items():
        start = time.process_time()
        fn = make()
        loaded = time.process_time()
        fn(ids)
        out[name] = {
            "load_cpu_s": round(loaded - start, 2),
            "window_cpu_s": round(time.process_time() - loaded, 2),
        }
        del fn
    return out


def _transformers_logits(model_dir: Path) -> object:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def run(ids: object) -> object:
        with torch.inference_mode():
            return model(torch.as_tensor(ids)[None]).logits[0].numpy()

    return run


def main() -> None:
    """CLI entry: ``prepare`` or ``run``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=("prepare", "run", "per-window"))
    parser.add_argument("--dir", type=Path, default=Path("out/bench-eval-0.5b"))
    parser.add_argument("--label", default="current")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--note", default="Qwen2-0.5B shape, random weights (time and memory only)")
    args = parser.parse_args()
    if args.action == "prepare":
        prepare(args.dir)
        return
    if args.action == "per-window":
        print(json.dumps(per_window(args.dir), indent=2))
        return
    result = run(args.dir, args.label, args.windows, args.note)
    rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    rows.append(result)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
