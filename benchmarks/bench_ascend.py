"""Ascend exporter on the real SmolLM2-135M, measured against onnxruntime-genai's CPU graph.

Per profile: export time and size, lint time, greedy agreement with PyTorch, and ONNX Runtime
CPU decode speed next to onnxruntime-genai's CPU graph.

No NPU here: ONNX Runtime on the CPU is the only speed this machine can measure for the Ascend
graph (fp16, run by ORT's CPU EP through fp32 casts). The peer is the onnxruntime-genai model
builder's fp32 CPU export of the same weights (``-p fp32 -e cpu``): same model, same machine,
same run, greedy decoding of the same prompt with the same number of new tokens; the ratio is
what the docs quote. Each generation runs in its own process.

Usage: python benchmarks/bench_ascend.py [--work /tmp/bench-ascend] [--new-tokens 64]
       [--profiles ascend-310p-2gb ascend-310b-2gb]
Results: benchmarks/results/ascend.json and lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "ascend.json"
PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
)


def export_profile(base: Path, profile_name: str, out: Path) -> dict[str, Any]:
    """Export ``base`` for one Ascend profile; time, size, lint facts."""
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.exporters.ascend.exporter import AscendExporter
    from rslora_deploy.exporters.ascend.options import AscendExportConfig
    from rslora_deploy.profiles import load_profile

    (out / "reports").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    art = AscendExporter().export(
        Artifact("hf", base), out / "model", AscendExportConfig(), load_profile(profile_name),
        out / "export.log",
    )  # fmt: skip
    seconds = time.perf_counter() - start
    lint = json.loads((out / "reports" / "op_lint.json").read_text())
    return {
        "profile": profile_name,
        "export_seconds": round(seconds, 1),
        "onnx_bytes": (art.path / "decoder.onnx").stat().st_size,
        "lint_seconds": lint["seconds"],
        "lint_passed": lint["passed"],
        "unsupported_nodes": lint["unsupported_nodes"],
        "lint_warnings": len(lint["warnings"]),
        "nodes": lint["nodes"],
        "gears_static": {g: v["static"] for g, v in lint["gears"].items()},
        "max_length": art.meta["max_length"],
    }


def from_package(package: Path) -> dict[str, Any]:
    """Export time and size, lint facts from a built package's reports."""
    build = json.loads((package / "reports" / "build.json").read_text())
    lint = json.loads((package / "reports" / "op_lint.json").read_text())
    stages = {s["name"]: s for s in build["stages"]}
    return {
        "profile": build["profile"],
        "export_seconds": round(stages["export_onnx"]["seconds"], 1),
        "export_peak_rss_bytes": stages["export_onnx"]["peak_rss_bytes"],
        "onnx_bytes": (package / "model" / "decoder.onnx").stat().st_size,
        "lint_seconds": lint["seconds"],
        "lint_passed": lint["passed"],
        "unsupported_nodes": lint["unsupported_nodes"],
        "lint_warnings": len(lint["warnings"]),
        "nodes": lint["nodes"],
        "gears_static": {g: v["static"] for g, v in lint["gears"].items()},
        "source": f"reports of {package}",
    }


def greedy_agreement(base: Path, model_dir: Path, new_tokens: int) -> dict[str, Any]:
    """Runner (ORT CPU) vs the exported module in PyTorch, 5 prompts, ``new_tokens`` each."""
    from transformers import AutoTokenizer

    from rslora_deploy.exporters.ascend.exporter import run_shipped_runner
    from rslora_deploy.exporters.ascend.model import greedy_reference
    from rslora_deploy.exporters.ascend.weights import build_decoder

    decoder, _ = build_decoder(base, 128)  # masked buffer slots add nothing: 128 covers it
    tok = AutoTokenizer.from_pretrained(base)
    rows = []
    for text in PROMPTS:
        prompt = tok(text)["input_ids"]
        got = run_shipped_runner(model_dir, ids=prompt, max_new_tokens=new_tokens, ignore_eos=True)
        want, ties = greedy_reference(decoder, prompt, new_tokens, 2.0**-9)
        pairs = enumerate(zip(got["new_ids"], want, strict=True))
        diff = next((i for i, (a, b) in pairs if a != b), None)
        rows.append({
            "prompt": text, "same": diff is None, "first_difference": diff,
            "at_fp16_tie": None if diff is None else ties[diff], "text": tok.decode(want),
        })  # fmt: skip
    return {"prompts": len(rows), "identical": sum(r["same"] for r in rows), "rows": rows}


def genai_cpu_speed(base: Path, work: Path, prompt: str, new_tokens: int) -> dict[str, Any]:
    """onnxruntime-genai fp32 CPU export of the same weights, decoded in a child process."""
    from rslora_deploy.exporters.genai.smoke import smoke_generate

    out = work / "genai-fp32"
    if not (out / "genai_config.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(base),
             "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(work / "cache")],
            check=True, capture_output=True,
        )  # fmt: skip
    return smoke_generate(out, prompt, max_new_tokens=new_tokens, max_length=1024)


def main() -> None:
    """Run everything and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-ascend"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--profiles",
        nargs="+",
        default=["ascend-310p-2gb", "ascend-310b-2gb"],
        help="Ascend profiles",
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="a package built with `rslora-deploy build --profile P`: take export time and size "
        "from its reports instead of exporting again (one profile)",
    )
    parser.add_argument("--no-greedy", action="store_true", help="skip the PyTorch comparison")
    args = parser.parse_args()
    from rslora_deploy.data.assets import default_base_dir
    from rslora_deploy.exporters.ascend.exporter import run_shipped_runner

    base = default_base_dir()
    result: dict[str, Any] = {"machine": describe(), "profiles": []}
    for name in args.profiles:
        if args.reuse is not None:
            row, model_dir = from_package(args.reuse), args.reuse / "model"
        else:
            row, model_dir = (
                export_profile(base, name, args.work / name),
                args.work / name / "model",
            )
        runs = [
            run_shipped_runner(model_dir, prompt=PROMPTS[0], max_new_tokens=args.new_tokens,
                               ignore_eos=True)
            for _ in range(3)
        ]  # fmt: skip
        row["ort_cpu_decode_tok_s"] = sorted(r["decode_tokens_per_second"] for r in runs)[1]
        row["ort_cpu_peak_rss_bytes"] = runs[-1]["peak_rss_bytes"]
        if (
            name == "ascend-310p-2gb" and not args.no_greedy
        ):  # same weights in both profiles; only KV length differs
            row["greedy"] = greedy_agreement(base, model_dir, 32)
        result["profiles"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "greedy"}), flush=True)
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    peer = genai_cpu_speed(base, args.work, PROMPTS[0], args.new_tokens)
    result["genai_fp32_cpu_decode_tok_s"] = peer["decode_tokens_per_second"]
    for row in result["profiles"]:
        row["decode_ratio_vs_genai_fp32_cpu"] = round(
            row["ort_cpu_decode_tok_s"] / peer["decode_tokens_per_second"], 3
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
