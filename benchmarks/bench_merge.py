"""Merge benchmark: our merge vs peft's merge_and_unload(), RSG-1 throughput, demo regeneration.

    python benchmarks/bench_merge.py            # writes docs/benchmarks-merge.md
    python benchmarks/bench_merge.py --dora     # LoRA vs DoRA section, benchmarks/results/

Setup (``--dora``, issue #18): the same r=16 factors once as plain LoRA and once as DoRA (the same
lora_A/lora_B plus a ``lora_magnitude_vector`` moved +-30 % off its initial row norm ||W||), on the
same SmolLM2-135M. Each repeat runs both in fresh subprocesses, alternating; a worker times
``merge_deltas`` alone (what DoRA changes) and the whole ``merge_adapter`` (load + merge + save).

Setup: a PEFT LoRA adapter (r=16, alpha=32, all 7 linear projections of every layer, random
non-zero A and B) on SmolLM2-135M-Instruct. Each merge runs in its own subprocess so its peak RSS
(ru_maxrss) is measured separately; each side loads the base, loads the adapter, merges and saves a
safetensors HF directory. The runs alternate (ours, peft, ours, peft, ...) and the best wall time
of each is reported, because the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(kind: str, base: Path, adapter: Path, out: Path) -> dict:
    """One merge in this process; returns timings and peak RSS."""
    import torch

    torch.set_num_threads(1)
    if kind == "peft":
        import peft  # noqa: F401  (import cost outside the timed region, like ours)
    from transformers import AutoModelForCausalLM

    from rslora_deploy.config import AdapterConfig, MergeConfig
    from rslora_deploy.stages.merge import merge_adapter

    rss_imports = _rss_mib()
    start = time.perf_counter()
    if kind == "ours":
        merge_adapter(base, adapter, out, MergeConfig(dtype="auto"), AdapterConfig())
        merge_s = None
    else:
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        model = PeftModel.from_pretrained(model, adapter)
        t0 = time.perf_counter()
        model = model.merge_and_unload(safe_merge=True)
        merge_s = time.perf_counter() - t0
        model.save_pretrained(out)
    return {
        "kind": kind,
        "wall_s": time.perf_counter() - start,
        "merge_only_s": merge_s,
        "peak_rss_mib": _rss_mib(),
        "rss_after_imports_mib": rss_imports,
    }


def dora_worker(adapter: Path, base: Path, out: Path, inner: int) -> dict:
    """LoRA or DoRA timings in this process: whole merge_adapter, then merge_deltas alone.

    ``merge_deltas`` runs ``inner`` times on the same loaded model (its weights restored between
    runs) and the fastest counts: the machine is shared and one merge is only about a second.
    """
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from rslora_deploy.adapters.detect import load_adapter
    from rslora_deploy.adapters.merge_math import merge_deltas
    from rslora_deploy.config import AdapterConfig, MergeConfig
    from rslora_deploy.stages.merge import merge_adapter

    start = time.perf_counter()
    merge_adapter(base, adapter, out, MergeConfig(dtype="auto"), AdapterConfig())
    end_to_end = time.perf_counter() - start
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    original = {key: value.detach().clone() for key, value in model.state_dict().items()}
    merges = []
    for _ in range(inner):  # the base weights are put back between merges
        deltas = load_adapter(adapter).deltas
        start = time.perf_counter()
        stats = merge_deltas(model, deltas)
        merges.append(time.perf_counter() - start)
        with torch.no_grad():
            for key, value in model.state_dict().items():
                value.copy_(original[key])
    return {
        "kind": adapter.name,
        "merge_adapter_s": end_to_end,
        "merge_deltas_s": min(merges),
        "merge_deltas_all_s": merges,
        "modules": len(stats),
        "dora_modules": sum(s.magnitude_factor is not None for s in stats),
        "peak_rss_mib": _rss_mib(),
    }


def make_dora_twin(base: Path, lora: Path, out: Path) -> None:
    """``lora``'s exact factors as a DoRA adapter: peft's saved DoRA files with A, B swapped in.

    peft initialises each magnitude to the row norm of the base weight (B = 0 at init); it is then
    scaled by a factor in [0.7, 1.3] per row, so every row is really rescaled.
    """
    import peft
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, use_dora=True)
    peft.get_peft_model(model, config).save_pretrained(out)
    path = out / "adapter_model.safetensors"
    tensors, factors = load_file(path), load_file(lora / "adapter_model.safetensors")
    assert set(factors) < set(tensors), "the DoRA twin must hold every LoRA tensor"
    gen = torch.Generator().manual_seed(1)
    for key, value in tensors.items():
        if key.endswith("lora_magnitude_vector"):
            tensors[key] = value * (1 + 0.3 * (2 * torch.rand(value.shape, generator=gen) - 1))
    tensors.update(factors)
    save_file(tensors, path)


def run_dora(args: argparse.Namespace) -> None:
    """LoRA vs DoRA on SmolLM2, alternating; result JSON and the docs section."""
    import os

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _docs import write_section
    from _machine import describe

    from rslora_deploy.data.assets import default_base_dir

    base = default_base_dir()
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"lora": [], "dora": []}
    with tempfile.TemporaryDirectory() as tmp:
        lora, dora = Path(tmp) / "lora", Path(tmp) / "dora"
        make_adapter(base, lora)
        make_dora_twin(base, lora, dora)
        for i in range(args.repeats):
            for adapter in (lora, dora) if i % 2 == 0 else (dora, lora):
                out = Path(tmp) / f"{adapter.name}{i}"
                argv = [sys.executable, __file__, "--dora-worker", "--adapter", str(adapter),
                        "--base", str(base), "--out", str(out),
                        "--inner", str(args.inner)]  # fmt: skip
                proc = subprocess.run(argv, capture_output=True, text=True, check=True)
                runs[adapter.name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(runs[adapter.name][-1], flush=True)
    load_after = os.getloadavg()
    best = {
        kind: {key: min(r[key] for r in rows) for key in ("merge_deltas_s", "merge_adapter_s")}
        for kind, rows in runs.items()
    }
    result = {
        "machine": describe(),
        "date": time.strftime("%Y-%m-%d"),
        "load_average_1_5_15": {"before": list(load_before), "after": list(load_after)},
        "torch_threads": 1,
        "repeats": args.repeats,
        "inner": args.inner,
        "runs": runs,
        "best": best,
        "ratio_dora_over_lora": {
            key: best["dora"][key] / best["lora"][key] for key in best["lora"]
        },
        "target": 1.3,
    }
    print(json.dumps(result, indent=2))
    results = REPO / "benchmarks" / "results" / "merge_dora.json"
    results.write_text(json.dumps(result, indent=2) + "\n")
    write_section(args.doc, DORA_BEGIN, DORA_END, dora_section(result))


DORA_BEGIN, DORA_END = "<!-- bench_merge_dora:begin -->", "<!-- bench_merge_dora:end -->"


def _median_ratio(runs: dict[str, list[dict]]) -> float:
    import statistics

    median = {k: statistics.median(r["merge_deltas_s"] for r in v) for k, v in runs.items()}
    return median["dora"] / median["lora"]


def dora_section(result: dict) -> str:
    """The LoRA vs DoRA section of docs/benchmarks-merge.md."""
    best, ratio = result["best"], result["ratio_dora_over_lora"]
    before, after = result["load_average_1_5_15"]["before"], result["load_average_1_5_15"]["after"]
    runs = "; ".join(
        f"{kind} {r['merge_deltas_s']:.2f} / {r['merge_adapter_s']:.2f} s"
        for kind, rows in result["runs"].items()
        for r in rows
    )
    return "\n".join([
        DORA_BEGIN,
        f"## DoRA vs LoRA merge (`python benchmarks/bench_merge.py --dora`, {result['date']})",
        "",
        f"Machine: {result['machine']}. 1-minute load average {before[0]:.2f} before, "
        f"{after[0]:.2f} after (5-minute {before[1]:.2f} / {after[1]:.2f}). One torch thread; "
        f"each run a fresh subprocess, LoRA and DoRA alternating, {result['repeats']} each; in "
        f"each, `merge_deltas` ran {result['inner']} times on the restored base; best of each.",
        "",
        "Workload: PEFT r=16, alpha=32 on all 7 linear projections (210 modules) of "
        "SmolLM2-135M-Instruct (fp32). The DoRA adapter holds the LoRA adapter's exact lora_A and "
        "lora_B plus a `lora_magnitude_vector` per module, peft's initial row norm scaled by a "
        "random factor in [0.7, 1.3] per row. Raw numbers: `benchmarks/results/merge_dora.json`.",
        "",
        "| | LoRA (s) | DoRA (s) | DoRA / LoRA |",
        "|---|---:|---:|---:|",
        f"| `merge_deltas` alone (every weight: dW, add, DoRA rescale, checks, stats) | "
        f"{best['lora']['merge_deltas_s']:.2f} | {best['dora']['merge_deltas_s']:.2f} | "
        f"**{ratio['merge_deltas_s']:.2f}** |",
        f"| `merge_adapter` (load base + adapter, merge, save, report) | "
        f"{best['lora']['merge_adapter_s']:.2f} | {best['dora']['merge_adapter_s']:.2f} | "
        f"{ratio['merge_adapter_s']:.2f} |",
        "",
        f"The median over the subprocesses of their fastest `merge_deltas` gives DoRA / LoRA = "
        f"{_median_ratio(result['runs']):.2f}: on this shared machine single merges vary by "
        "+-30 %, so the ratio's uncertainty is of that order.",
        "",
        f"Target (issue #18): DoRA / LoRA <= {result['target']}. All runs (merge_deltas / "
        f"merge_adapter, the best of each subprocess): {runs}.",
        DORA_END,
    ])  # fmt: skip


def make_adapter(base: Path, out: Path) -> None:
    """r=16 LoRA on all 7 projections with random non-zero A and B, saved by peft."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    wrapped.save_pretrained(out)


def rsg_numbers() -> dict:
    """RSG-1 values/s, and the time to regenerate + verify every projection of the demo adapter."""
    from rslora_deploy.adapters import demo_adapter_dir, rsg
    from rslora_deploy.adapters.detect import load_adapter
    from rslora_deploy.adapters.rslora_v1 import parse_config

    key = rsg.derive_key(0, "", "bench", "A")
    n = 50_000_000
    start = time.perf_counter()
    rsg.generate_range(key, 0, n)
    throughput = n / (time.perf_counter() - start)
    # The loader generates slab by slab (one (rows, cols) slab of P~ per call); measure that too.
    start = time.perf_counter()
    slabs = 500
    for index in range(slabs):
        rsg.generate_slab(key, index, 1536, 64)
    slab_throughput = slabs * 1536 * 64 / (time.perf_counter() - start)
    if not (demo_adapter_dir() / "rslora_config.json").is_file():
        raise SystemExit(
            "the demo adapter is missing; run benchmarks/bench_demo_adapter.py --train first"
        )
    cfg = parse_config((demo_adapter_dir() / "rslora_config.json").read_bytes())
    values = sum(cfg.k * cfg.r * (m.d_in + m.d_out) for m in cfg.modules.values())
    start = time.perf_counter()
    for entry in cfg.modules.values():
        for factor, rows, cols in (("A", cfg.r, entry.d_in), ("B", entry.d_out, cfg.r)):
            for _ in rsg.iter_slabs(
                rsg.derive_key(cfg.seed or 0, cfg.task_id, entry.name, factor), cfg.k, rows, cols
            ):
                pass
    regen = time.perf_counter() - start
    start = time.perf_counter()
    load_adapter(demo_adapter_dir())
    load = time.perf_counter() - start
    return {
        "values_per_s": throughput,
        "slab_values_per_s": slab_throughput,
        "demo_values": values,
        "demo_regen_s": regen,
        "demo_load_verify_s": load,
        "demo_modules": len(cfg.modules),
    }


def machine() -> dict:
    import numpy
    import peft
    import torch
    import transformers

    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import os

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "numpy": numpy.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=["ours", "peft"])
    parser.add_argument("--dora", action="store_true", help="LoRA vs DoRA merge time (#18)")
    parser.add_argument("--dora-worker", action="store_true")
    parser.add_argument("--inner", type=int, default=5, help="merge_deltas runs per --dora worker")
    parser.add_argument("--base", type=Path)
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks-merge.md")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.base, args.adapter, args.out)))
        return
    if args.dora_worker:
        print(json.dumps(dora_worker(args.adapter, args.base, args.out, args.inner)))
        return
    if args.dora:
        run_dora(args)
        return
    from rslora_deploy.data.assets import default_base_dir

    base = default_base_dir()
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    rsg_result = rsg_numbers()
    runs: dict[str, list[dict]] = {"ours": [], "peft": []}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "lora"
        make_adapter(base, adapter)
        for i in range(args.repeats):
            for kind in ("ours", "peft"):
                out = Path(tmp) / f"{kind}{i}"
                proc = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        kind,
                        "--base",
                        str(base),
                        "--adapter",
                        str(adapter),
                        "--out",
                        str(out),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs[kind].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(kind, runs[kind][-1], flush=True)
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
    peak = {k: max(r["peak_rss_mib"] for r in v) for k, v in runs.items()}
    result = {"machine": machine(), "runs": runs, "rsg": rsg_result, "base_mib": base_bytes / 2**20}
    print(json.dumps(result, indent=2))
    write_doc(args.doc, result, best, peak)


def write_doc(doc: Path, result: dict, best: dict, peak: dict) -> None:
    """Markdown table into docs/benchmarks-merge.md."""
    m, rsg_r, base_mib = result["machine"], result["rsg"], result["base_mib"]
    o, p = best["ours"], best["peft"]
    ours_rise = peak["ours"] - o["rss_after_imports_mib"]
    peft_rise = peak["peft"] - p["rss_after_imports_mib"]
    lines = [
        "# Merge benchmark",
        "",
        "Generated by `python benchmarks/bench_merge.py` (numbers measured, not estimated).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared with other jobs), Python "
        f"{m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft "
        f"{m['peft']}, numpy {m['numpy']}. Each merge ran in its own subprocess with 1 torch "
        "thread; best wall time of the repeats, highest peak RSS.",
        "",
        "Workload: PEFT LoRA r=16, alpha=32 on all 7 linear projections (210 modules) of "
        f"SmolLM2-135M-Instruct (fp32 safetensors, {base_mib:.0f} MiB), random non-zero A and "
        "B. Each side: load base + load adapter + merge + save a safetensors HF directory. Ours "
        "also validates, hashes and writes merge_report.json; peft runs `merge_and_unload("
        "safe_merge=True)`.",
        "",
        "| | ours | peft | ours / peft |",
        "|---|---:|---:|---:|",
        f"| wall time, load+merge+save (s) | {o['wall_s']:.2f} | {p['wall_s']:.2f} | "
        f"{o['wall_s'] / p['wall_s']:.2f} |",
        f"| peak RSS (MiB) | {peak['ours']:.0f} | {peak['peft']:.0f} | "
        f"{peak['ours'] / peak['peft']:.2f} |",
        f"| peak RSS after imports, increase (MiB) | {ours_rise:.0f} | {peft_rise:.0f} | "
        f"{ours_rise / peft_rise:.2f} |",
        f"| peak RSS / base model size | {peak['ours'] / base_mib:.2f} | "
        f"{peak['peft'] / base_mib:.2f} | |",
        f"| peak RSS increase / base model size | "
        f"{(peak['ours'] - o['rss_after_imports_mib']) / base_mib:.2f} | "
        f"{(peak['peft'] - p['rss_after_imports_mib']) / base_mib:.2f} | |",
        "",
        "All runs (s, MiB): "
        + "; ".join(
            f"{k} {r['wall_s']:.2f} s / {r['peak_rss_mib']:.0f} MiB"
            for k, v in result["runs"].items()
            for r in v
        ),
        "",
        "Targets (issue #3): no slower than peft (ratio <= 1) and peak RSS <= 1.3x the base "
        "model's size. The RSS measured after `import torch, transformers` and before loading "
        f"anything is {o['rss_after_imports_mib']:.0f} MiB of interpreter and libraries; the merge "
        "itself adds the increase row, which is the number compared with the base size. The "
        "whole-process peak includes that fixed library cost.",
        "",
        "## RSG-1",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| generation throughput, one 50 M-value call (one thread, numpy uint64) | "
        f"{rsg_r['values_per_s'] / 1e6:.1f} M values/s |",
        f"| generation throughput, slab by slab (1536 x 64 values per call, as the loader does) "
        f"| {rsg_r['slab_values_per_s'] / 1e6:.1f} M values/s |",
        f"| demo adapter: regenerate all projections ({rsg_r['demo_modules']} modules, "
        f"{rsg_r['demo_values'] / 1e6:.1f} M values) | {rsg_r['demo_regen_s']:.2f} s |",
        f"| demo adapter: load_adapter (regenerate + sha256-verify + build factors) | "
        f"{rsg_r['demo_load_verify_s']:.2f} s |",
        "",
    ]
    old = doc.read_text(encoding="utf-8") if doc.exists() else ""
    if DORA_BEGIN in old:  # keep the --dora section of an earlier run
        lines += [DORA_BEGIN + old.split(DORA_BEGIN, 1)[1].split(DORA_END, 1)[0] + DORA_END, ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
