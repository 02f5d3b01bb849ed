"""Decode speed, prefill time, peak RSS and size of our exported model vs the builder's own int4.

The peer is what a user of onnxruntime-genai would run without this tool: its model builder on
the full-precision model with ``-p int4`` and its defaults (its own RTN int4 for every MatMul,
the embedding included, ``accuracy_level`` 4). Ours is the export stage on a 4-bit checkpoint:
tied embedding kept in full precision and shared with lm_head, ``accuracy_level`` 1, and the
same with ``--protect-adapter``'s 8-bit modules; and ``ours_fast``, our export with the speed
knobs (``export.accuracy_level = 4``, ``export.lm_head_int4 = true``). All graphs are CPU-target
(fp32 activations, the ``cpu-2gb`` profile); this machine has no GPU, so the T4 graph's speed is
not measured here. The layouts are also compared side by side with the builder's best options,
with GPTQ and perplexity on 64 windows, in ``benchmarks/bench_vs_builder.py``.

Every model is built from the same merged weights (SmolLM2-135M + the demo adapter), quantized
with RTN: the speed of a ``MatMulNBits`` graph depends on its layout, not on how the codes were
chosen, and RTN keeps the benchmark to a few minutes. Each generation runs in its own process
(:func:`rslora_deploy.exporters.genai.smoke.smoke_generate`) with the same prompt (a Brown
evaluation passage), the same KV length and greedy decoding; the median of ``--runs`` is reported.

Perplexity of every graph on the same evaluation windows goes beside the speed: the peer's int4
embedding and int8 activations are part of why it is fast.

Usage: python benchmarks/bench_decode.py [--work /tmp/bench-decode] [--runs 3] [--windows 8]
Results: benchmarks/results/decode.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "decode.json"
MAX_LENGTH = 1024
NEW_TOKENS = 128


def _prompt(model_dir: Path, tokens: int) -> str:
    from rslora_deploy.evaluation.quality import _tokenizer, eval_windows

    tokenizer = _tokenizer(model_dir)
    ids = eval_windows(tokenizer, 1, tokens).input_ids[0][1:]
    return str(tokenizer.decode(ids))


def _prepare(work: Path) -> dict[str, Path]:
    """Merged model, plain and protected RTN checkpoints, and the four ONNX folders."""
    from rslora_deploy.adapters import demo_adapter_dir
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.config import AdapterConfig, MergeConfig, QuantizeConfig
    from rslora_deploy.data.assets import default_base_dir
    from rslora_deploy.exporters.genai.builder import export_onnx
    from rslora_deploy.exporters.genai.exporter import GenaiExporter
    from rslora_deploy.exporters.genai.options import GenaiExportConfig
    from rslora_deploy.quantizers.protection import plan_protection
    from rslora_deploy.stages.merge import merge_adapter
    from rslora_deploy.stages.quantize import quantize_model
    from rslora_deploy.testing.profiles import genai_cpu_profile

    base = default_base_dir()
    merged = work / "merged"
    if not (merged / "config.json").is_file():
        merge_adapter(base, demo_adapter_dir(), merged, MergeConfig(), AdapterConfig())
    cfg = QuantizeConfig(method="rtn", group_size=64)
    checkpoints = {"plain": work / "rtn", "protected": work / "rtn_protect"}
    if not (checkpoints["plain"] / "config.json").is_file():
        quantize_model(Artifact("hf", merged), checkpoints["plain"], cfg)
    if not (checkpoints["protected"] / "config.json").is_file():
        extras, _ = plan_protection(
            base, merged, cfg, cfg.protect_ratio, GenaiExporter.fused_groups
        )
        quantize_model(Artifact("hf", merged), checkpoints["protected"], cfg, extras=extras)
    profile = genai_cpu_profile()  # cpu-2gb: the genai CPU target
    variants = {
        "ours": (checkpoints["plain"], GenaiExportConfig(max_length=MAX_LENGTH)),
        "ours_accuracy_level_4": (
            checkpoints["plain"],
            GenaiExportConfig(max_length=MAX_LENGTH, accuracy_level=4),
        ),
        "ours_protect_adapter": (
            checkpoints["protected"],
            GenaiExportConfig(max_length=MAX_LENGTH),
        ),
        "ours_fast": (
            checkpoints["plain"],
            GenaiExportConfig(max_length=MAX_LENGTH, accuracy_level=4, lm_head_int4=True),
        ),
    }
    folders: dict[str, Path] = {}
    for name, (checkpoint, export_cfg) in variants.items():
        out = work / name
        if not (out / "genai_config.json").is_file():
            export_onnx(
                Artifact("hf-quantized", checkpoint), out, export_cfg, profile, work / f"{name}.log"
            )
        folders[name] = out
    peer = work / "peer_builder_int4"
    if not (peer / "genai_config.json").is_file():
        with (work / "peer.log").open("w") as log:
            subprocess.run(
                [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(merged),
                 "-o", str(peer), "-p", "int4", "-e", "cpu", "-c", str(work / "peer-cache")],
                stdout=log, stderr=subprocess.STDOUT, check=True,
            )  # fmt: skip
    folders["peer_builder_int4"] = peer
    return {"merged": merged, **folders}


def _measure(folder: Path, prompt: str, runs: int) -> dict[str, Any]:
    from rslora_deploy.exporters.genai.smoke import smoke_generate

    samples = [smoke_generate(folder, prompt, NEW_TOKENS, MAX_LENGTH) for _ in range(runs)]
    data_bytes = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    return {
        "decode_tokens_per_second": statistics.median(
            s["decode_tokens_per_second"] for s in samples
        ),
        "prefill_seconds": statistics.median(s["prefill_seconds"] for s in samples),
        "new_tokens": samples[0]["new_tokens"],
        "peak_rss_mib": round(max(s["peak_rss_bytes"] for s in samples) / 2**20),
        "model_mib": round(data_bytes / 2**20, 1),
        "runs": [s["decode_tokens_per_second"] for s in samples],
        "text_start": samples[0]["text"][-120:],
    }


def _perplexity(folders: dict[str, Path], windows: int) -> dict[str, Any]:
    """Perplexity of every ONNX folder on the same Brown evaluation windows (speed has a price)."""
    from rslora_deploy.evaluation.quality import _tokenizer, eval_windows, onnx_logits, run_lockstep

    text = eval_windows(_tokenizer(folders["ours"]), windows, 512)
    models = {name: onnx_logits(folder) for name, folder in folders.items()}
    return run_lockstep(models, text, "ours", [])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-decode"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folders = _prepare(args.work)
    prompt = _prompt(folders.pop("merged"), args.prompt_tokens)
    results = {name: _measure(folder, prompt, args.runs) for name, folder in folders.items()}
    quality = _perplexity(folders, args.windows)
    for name, entry in results.items():
        entry["perplexity"] = round(quality["models"][name]["perplexity"], 3)
        entry["greedy_agreement_with_ours"] = round(quality["models"][name]["greedy_agreement"], 4)
    peer = results["peer_builder_int4"]
    for entry in results.values():
        entry["decode_ratio_to_peer"] = round(
            entry["decode_tokens_per_second"] / peer["decode_tokens_per_second"], 3
        )
    report = {
        "machine": describe(),
        "protocol": {
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": NEW_TOKENS,
            "max_length": MAX_LENGTH,
            "runs": args.runs,
            "statistic": "median",
            "perplexity": f"Brown evaluation split, {args.windows} x 512 tokens, BOS per window",
        },
        "results": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(
        "| variant | decode tok/s | ratio to peer | prefill s | peak RSS MiB | model MiB "
        "| perplexity |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, e in results.items():
        print(
            f"| {name} | {e['decode_tokens_per_second']:.1f} | {e['decode_ratio_to_peer']:.2f} | "
            f"{e['prefill_seconds']:.3f} | {e['peak_rss_mib']} | {e['model_mib']} | "
            f"{e['perplexity']:.2f} |"
        )


if __name__ == "__main__":
    main()
