"""Memory estimate against the measured worst case on cpu-2gb (issue #9), and prediction speed.

    python benchmarks/bench_budget.py [--package PKG] [--lengths 512 2048] [--out JSON]

Without ``--package`` it builds the demo package for cpu-2gb first (``rslora-deploy build
--profile cpu-2gb``: SmolLM2-135M + demo adapter, GPTQ int4 g64, several minutes). For each
max_length it runs ``budget --measure``'s two probes (context-only; prompt of max_length - 16
tokens then decode to max_length), each in its own child process, and prints the estimate's
terms beside the measured peak RSS. It also times ``budget --model CONFIG --profile all`` on a
Qwen2.5-1.5B-shaped config.json (prediction, no weights) in a fresh process, and prices the
logits term of a Qwen2.5-0.5B-shaped config with and without last-token logits.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

QWEN_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}  # fmt: skip
QWEN_15B = {**QWEN_05B, "hidden_size": 1536, "intermediate_size": 8960,
            "num_hidden_layers": 28, "num_attention_heads": 12}  # fmt: skip
MIB = 2**20


def build_demo(out: Path) -> Path:
    """The demo package for cpu-2gb, built by the CLI."""
    cmd = [sys.executable, "-m", "rslora_deploy.cli.app", "build", "--profile", "cpu-2gb",
           "--out", str(out), "--overwrite", "--no-eval"]  # fmt: skip
    subprocess.run(cmd, check=True)
    return out


def measure_lengths(package: Path, lengths: list[int]) -> list[dict[str, Any]]:
    """Estimate and worst-case measurement at each max_length."""
    from rslora_deploy.cli.budget_cmd import price, resolve_target
    from rslora_deploy.memory.measure import measure_package
    from rslora_deploy.profiles import load_profile

    profile = load_profile("cpu-2gb")
    target = resolve_target(package, 4, 64)
    rows = []
    for length in lengths:
        report, _, _ = price(target, profile, length, None)
        measured = measure_package(target.onnx_dir, profile, max_length=length)  # type: ignore[arg-type]
        peak = measured["probes_bytes"]["worst_case_peak"]
        rows.append({"max_length": length, "estimate": report, "measured": measured,
                     "ratio": report["estimate_bytes"] / peak})  # fmt: skip
    return rows


def time_profile_all() -> dict[str, float]:
    """Wall and CPU seconds of ``budget --model <1.5B config> --profile all`` in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(QWEN_15B))
        code = (
            "import resource, time; t = time.perf_counter()\n"
            "from rslora_deploy.cli.app import main\n"
            f"main(['budget', '--model', {tmp!r}, '--profile', 'all', '--format', 'json'])\n"
            "ru = resource.getrusage(resource.RUSAGE_SELF)\n"
            "print('TIMING', time.perf_counter() - t, ru.ru_utime + ru.ru_stime)\n"
        )
        start = __import__("time").perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        total = __import__("time").perf_counter() - start
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("TIMING"))
    _, in_process, cpu = line.split()
    return {"process_wall_s": total, "command_wall_s": float(in_process), "cpu_s": float(cpu)}


def logits_terms() -> dict[str, int]:
    """Qwen2.5-0.5B at max_length 2048 on cpu-2gb: logits term with every position vs last."""
    from rslora_deploy.exporters.base import Shape
    from rslora_deploy.memory.estimate import exporter_of
    from rslora_deploy.model_view import model_view
    from rslora_deploy.profiles import load_profile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(QWEN_05B))
        view = model_view(Path(tmp))
    profile = load_profile("cpu-2gb")
    terms = exporter_of(profile).budget_terms
    return {
        "every_position": terms(view, profile, shape=Shape(2048, 1, False))["logits"],
        "last_position": terms(view, profile, shape=Shape(2048, 1, True))["logits"],
    }


def markdown(rows: list[dict[str, Any]], timing: dict[str, float], logits: dict[str, int]) -> str:
    """The docs/benchmarks.md section."""
    from _machine import describe

    lines = [
        "| max_length | weights | kv_cache | logits | activations | reserved | estimate | "
        "measured context | measured peak | estimate / measured |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        terms, probes = row["estimate"]["terms_bytes"], row["measured"]["probes_bytes"]
        cells = [terms[k] / MIB for k in ("weights", "kv_cache", "logits", "activations",
                                          "reserved")]  # fmt: skip
        lines.append(
            f"| {row['max_length']} | "
            + " | ".join(f"{c:.1f}" for c in cells)
            + f" | {row['estimate']['estimate_bytes'] / MIB:.1f} | {probes['context'] / MIB:.1f}"
            f" | {probes['worst_case_peak'] / MIB:.1f} | {row['ratio']:.3f} |"
        )
    lines += [
        "",
        f"`budget --model <Qwen2.5-1.5B config.json> --profile all`: {timing['command_wall_s']:.2f}"
        f" s wall in the command ({timing['cpu_s']:.2f} s CPU for the whole process, "
        f"{timing['process_wall_s']:.2f} s wall with interpreter start).",
        f"Qwen2.5-0.5B at max_length 2048 on cpu-2gb, logits term: every position "
        f"{logits['every_position'] / MIB:.1f} MiB, last position "
        f"{logits['last_position'] / MIB:.2f} MiB.",
        "",
        f"Machine: {describe()} (shared with other jobs: timings vary, RSS does not).",
    ]
    return "\n".join(lines)


def main() -> None:
    """Run everything, print the markdown, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--package", type=Path, default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/budget.json"))
    args = parser.parse_args()
    package = args.package or build_demo(Path(tempfile.mkdtemp()) / "demo-cpu-2gb")
    timing, logits = time_profile_all(), logits_terms()  # cheap ones first
    rows = measure_lengths(package, args.lengths)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "profile_all_timing": timing,
                                    "qwen05b_logits": logits}, indent=2) + "\n")  # fmt: skip
    print(markdown(rows, timing, logits))


if __name__ == "__main__":
    main()
