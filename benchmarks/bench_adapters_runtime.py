"""Run-time adapters vs merged packages: decode speed, load and switch time, resident bytes.

One run, side by side, on the cpu-2gb profile (CPU graph, fp32 activations, accuracy level 4):

* ``base-only``: ``build --no-adapter``, the graph without adapter inputs (the peer of "no
  adapter active");
* ``multi``: one package with two run-time adapters over the same base: ``lora_qv`` (PEFT LoRA,
  rank 8 on q/v) and ``demo`` (the embedded RS-LoRA demo adapter, rank 64 on every projection);
* ``multi-qv``: the package of ``lora_qv`` alone (branches on the q/k/v nodes only);
* ``merged-lora_qv`` and ``merged-demo``: the single-adapter merged package of each.

Every package is quantized with RTN (the speed of a MatMulNBits graph depends on its layout,
not on how its codes were chosen). Decode tok/s is measured in this process with
onnxruntime-genai, greedy, ``NEW_TOKENS`` new tokens after a 200-token Brown prompt, the first
token excluded (that is prefill); the median of ``--runs``. ``load_s`` is ``og.Adapters.load``;
``switch_to_first_token_s`` is a fresh generator with the adapter active, the 200-token prompt
appended and the first token generated (what a switch costs), beside the same on the base
(``prefill_200_s``). ``resident_bytes`` is the RSS growth of loading the adapter, beside its file
size.

Usage: python benchmarks/bench_adapters_runtime.py [--work /tmp/bench-adapters] [--runs 3]
Results: benchmarks/results/adapters_runtime.json and a section of docs/adapters-runtime.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _docs import write_section  # noqa: E402
from _machine import describe  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "adapters_runtime.json"
DOC = ROOT.parent / "docs" / "adapters-runtime.md"
BEGIN, END = "<!-- bench_adapters_runtime: begin -->", "<!-- bench_adapters_runtime: end -->"
NEW_TOKENS = 128
PROMPT_TOKENS = 200


def _build(out: Path, *flags: str) -> Path:
    cmd = [sys.executable, "-m", "rslora_deploy.cli.app", "--quiet", "build", "--profile"]
    cmd += ["cpu-2gb", "--method", "rtn", "--no-eval", "--overwrite", "--out", str(out), *flags]
    subprocess.run(cmd, check=True)
    return out


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text(encoding="ascii").split()[1]) * 4096


def _prompt_ids(model_dir: Path) -> Any:
    from rslora_deploy.evaluation.quality import _tokenizer, eval_windows

    return eval_windows(_tokenizer(model_dir), 1, PROMPT_TOKENS + 1).input_ids[0][1:]


def _decode(model: Any, ids: Any, runs: int, activate: Any = None) -> dict[str, float]:
    """Median decode tok/s and prefill+first-token seconds of greedy generation."""
    import numpy as np
    import onnxruntime_genai as og

    speeds, firsts = [], []
    for _ in range(runs):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + NEW_TOKENS + 1)
        start = time.perf_counter()
        generator = og.Generator(model, params)
        if activate is not None:
            activate(generator)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        generator.generate_next_token()
        first = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            generator.generate_next_token()
        end = time.perf_counter()
        firsts.append(first - start)
        speeds.append((NEW_TOKENS - 1) / (end - first))
    return {"decode_tok_s": statistics.median(speeds), "first_token_s": statistics.median(firsts)}


def measure(work: Path, runs: int) -> dict[str, Any]:
    """Build the four packages and measure them (module doc)."""
    import onnxruntime_genai as og

    from rslora_deploy.adapters import demo_adapter_dir
    from rslora_deploy.data.assets import default_base_dir
    from rslora_deploy.testing.adapters import random_peft_adapter

    base = default_base_dir()
    lora = work / "lora_qv"
    if not lora.is_dir():
        random_peft_adapter(base, lora, "lora", r=8, targets=["q_proj", "v_proj"], seed=1, std=0.05)
    adapters = {"lora_qv": lora, "demo": demo_adapter_dir()}
    packages = {
        "base-only": _build(work / "base-only", "--no-adapter"),
        "multi": _build(work / "multi", *[f"--adapter={n}={p}" for n, p in adapters.items()]),
        "multi-qv": _build(work / "multi-qv", f"--adapter=lora_qv={lora}"),
        **{
            f"merged-{n}": _build(work / f"merged-{n}", f"--adapter={p}")
            for n, p in adapters.items()
        },
    }
    ids = _prompt_ids(packages["base-only"] / "model")
    rows: dict[str, Any] = {}
    for name in ("base-only", "merged-lora_qv", "merged-demo"):
        rows[name] = _decode(og.Model(str(packages[name] / "model")), ids, runs)
    rows["multi-qv:base"] = _decode(og.Model(str(packages["multi-qv"] / "model")), ids, runs)
    manifest = json.loads((packages["multi"] / "manifest.json").read_text())
    model = og.Model(str(packages["multi"] / "model"))
    rows["multi:base"] = _decode(model, ids, runs)
    handles = og.Adapters(model)
    for record in manifest["adapters"]:
        before = _rss()
        start = time.perf_counter()
        handles.load(str(packages["multi"] / record["file"]), record["name"])
        load_s = time.perf_counter() - start
        resident = _rss() - before
        activate = lambda g, n=record["name"]: g.set_active_adapter(handles, n)  # noqa: E731
        row = _decode(model, ids, runs, activate)
        row.update(
            load_s=load_s,
            resident_bytes=resident,
            file_bytes=record["bytes"],
            resident_vs_file=resident / record["bytes"],
            switch_to_first_token_s=row["first_token_s"],
        )
        rows[f"multi:{record['name']}"] = row
    prefill = rows["multi:base"]["first_token_s"]
    ratios = {
        "base_no_adapter_vs_base_only": rows["multi:base"]["decode_tok_s"]
        / rows["base-only"]["decode_tok_s"],
        "qv_package_no_adapter_vs_base_only": rows["multi-qv:base"]["decode_tok_s"]
        / rows["base-only"]["decode_tok_s"],
        **{
            f"{n}_active_vs_merged": rows[f"multi:{n}"]["decode_tok_s"]
            / rows[f"merged-{n}"]["decode_tok_s"]
            for n in adapters
        },
        **{
            f"{n}_switch_minus_prefill_s": rows[f"multi:{n}"]["switch_to_first_token_s"] - prefill
            for n in adapters
        },
    }
    return {
        "machine": describe(),
        "runs": runs,
        "new_tokens": NEW_TOKENS,
        "prompt_tokens": PROMPT_TOKENS,
        "rows": rows,
        "ratios": ratios,
    }


def _section(result: dict[str, Any]) -> str:
    lines = [
        BEGIN,
        f"Measured by `benchmarks/bench_adapters_runtime.py` on {result['machine']} "
        f"(cpu-2gb, RTN int4, median of {result['runs']} runs, {result['new_tokens']} new tokens "
        f"after a {result['prompt_tokens']}-token prompt).",
        "",
        "| package / adapter | decode tok/s | prefill + 1st token s | load s | resident / file |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        load = f"{row['load_s']:.3f}" if "load_s" in row else ""
        resident = (
            f"{row['resident_bytes'] / 2**20:.1f} / {row['file_bytes'] / 2**20:.1f} MiB"
            if "file_bytes" in row
            else ""
        )
        lines.append(
            f"| {name} | {row['decode_tok_s']:.1f} | {row['first_token_s']:.3f} | {load} | "
            f"{resident} |"
        )
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["ratios"].items()]
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    """Measure, write the JSON result and the docs section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-adapters"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = measure(args.work, args.runs)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    write_section(DOC, BEGIN, END, _section(result))
    print(json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    main()
