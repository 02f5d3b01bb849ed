"""Dequantizing a bitsandbytes 4-bit base: our numpy code vs bitsandbytes' CPU dequantize_4bit.

    python benchmarks/bench_dequant_bnb.py            # SmolLM2-135M shapes, nf4 + double quant
    python benchmarks/bench_dequant_bnb.py --quant-type fp4 --no-double-quant --write-doc

Setup: the 210 decoder projections of SmolLM2-135M (30 layers x q/k/v/o/gate/up/down, 106 M
weights), drawn N(0, 0.02) and quantized once by bitsandbytes' ``quantize_4bit`` (block size 64).
Each side then dequantizes every weight to float32 from the stored tensors, in memory (no file
I/O): ours is ``quantizers.bnb4.dequantize_weight`` (numpy, one thread), bitsandbytes' is
``functional.dequantize_4bit`` (its C kernel, torch's thread count). After one untimed pass of
each, one timed run each, ours first; every result is checked equal to the other (sign of zero
aside) before the times are reported.
Writes ``benchmarks/results/dequant_bnb.json``; ``--write-doc`` also writes its section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _docs import write_section  # noqa: E402
from _machine import describe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
RESULT = REPO / "benchmarks" / "results" / "dequant_bnb.json"
BEGIN, END = "<!-- bench_dequant_bnb:begin -->", "<!-- bench_dequant_bnb:end -->"
# SmolLM2-135M: hidden 576, 3 KV heads of 64, MLP 1536, 30 layers.
SHAPES = {
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}


def quantized_weights(layers: int, quant_type: str, nested: bool) -> list[tuple[str, dict]]:
    """``(name, stored tensors)`` per weight, as ``as_dict(packed=True)`` stores them."""
    import bitsandbytes.functional as bnbf
    import torch

    gen = torch.Generator().manual_seed(0)
    out = []
    for layer in range(layers):
        for proj, shape in SHAPES.items():
            w = torch.randn(shape, generator=gen) * 0.02
            packed, state = bnbf.quantize_4bit(
                w, blocksize=64, quant_type=quant_type, compress_statistics=nested
            )
            out.append((f"model.layers.{layer}.{proj}.weight", {"": packed, **state.as_dict(True)}))
    return out


def run_ours(weights: list[tuple[str, dict]]) -> tuple[float, list]:
    from rslora_deploy.quantizers import bnb4

    prepared = []
    for name, stored in weights:
        key = next(k for k in stored if k.startswith(bnb4.STATE_PREFIX))
        state = bnb4.parse_quant_state(name, stored[key].numpy().tobytes(), key.rpartition("__")[2])
        prepared.append((name, state, {k: v.numpy() for k, v in stored.items() if k != key}))
    start = time.perf_counter()
    results = [bnb4.dequantize_weight(name, state, arrays) for name, state, arrays in prepared]
    return time.perf_counter() - start, results


def run_bnb(weights: list[tuple[str, dict]]) -> tuple[float, list]:
    import bitsandbytes.functional as bnbf
    import torch

    cpu = torch.device("cpu")
    prepared = []
    for _, stored in weights:
        state = bnbf.QuantState.from_dict({k: v for k, v in stored.items() if k}, device=cpu)
        prepared.append((stored[""], state))
    start = time.perf_counter()
    results = [bnbf.dequantize_4bit(packed, state) for packed, state in prepared]
    return time.perf_counter() - start, [r.numpy() for r in results]


def run_file_to_file(weights: list[tuple[str, dict]], quant_type: str) -> tuple[float, int]:
    """Ours end to end as stage ``load`` runs it: read the checkpoint, write float32 shards."""
    import tempfile

    from safetensors.torch import save_file

    from rslora_deploy.adapters.st_io import SafetensorsFile
    from rslora_deploy.quantizers import bnb4

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        src.mkdir()
        out.mkdir()
        tensors = {
            (f"{name}.{k}" if k else name): v.contiguous()
            for name, stored in weights
            for k, v in stored.items()
        }
        save_file(tensors, str(src / "model.safetensors"))
        qcfg = {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "bnb_4bit_quant_type": quant_type,
        }
        (src / "config.json").write_text(json.dumps({"quantization_config": qcfg}))
        start = time.perf_counter()
        bnb4.dequantize_checkpoint(src, out, [SafetensorsFile(src / "model.safetensors")])
        seconds = time.perf_counter() - start
        written = (out / "model.safetensors").stat().st_size
    return seconds, written


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--write-doc", action="store_true")
    args = parser.parse_args()
    import numpy as np
    import torch

    nested = not args.no_double_quant
    load_average = round(os.getloadavg()[0], 1)
    weights = quantized_weights(args.layers, args.quant_type, nested)
    n = sum(int(np.prod(s)) for s in SHAPES.values()) * args.layers
    # One untimed pass each first: library load, first calls, and faulting in the ~0.4 GB the
    # results take (a cold pass measured 0.26-1.9 s for bitsandbytes, 0.07 s warm).
    run_bnb(weights)
    run_ours(weights)
    ours_s, mine = run_ours(weights)
    bnb_s, theirs = run_bnb(weights)
    for (name, _), a, b in zip(weights, mine, theirs, strict=True):
        assert np.array_equal(a + np.float32(0), b + np.float32(0)), name
    del mine, theirs
    file_s, written = run_file_to_file(weights, args.quant_type)
    result = {
        "date": str(date.today()),
        "machine": describe(),
        "load_average_1min": load_average,
        "torch_threads": torch.get_num_threads(),
        "quant_type": args.quant_type,
        "double_quant": nested,
        "blocksize": 64,
        "weights": len(weights),
        "elements": n,
        "ours_s": round(ours_s, 3),
        "bitsandbytes_s": round(bnb_s, 3),
        "ours_over_bitsandbytes": round(ours_s / bnb_s, 2),
        "ours_melem_per_s": round(n / ours_s / 1e6, 1),
        "bitsandbytes_melem_per_s": round(n / bnb_s / 1e6, 1),
        "ours_file_to_file_s": round(file_s, 3),
        "written_bytes": written,
    }
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    dq = "double quant" if nested else "no double quant"
    section = "\n".join([
        BEGIN,
        f"## QLoRA base: dequantizing bnb 4-bit weights (`python benchmarks/bench_dequant_bnb.py`, "
        f"{result['date']})",
        "",
        f"Machine: {result['machine']}. Shared CPU (1-minute load average {load_average} at the "
        "start); one timed run each after an untimed one, in memory (no file I/O).",
        "",
        f"{len(weights)} decoder projections of SmolLM2-135M's shapes ({n / 1e6:.0f} M weights), "
        f"{args.quant_type}, block size 64, {dq}, quantized by bitsandbytes 0.50.2; both sides "
        "produce the same float32 values (checked).",
        "",
        "| dequantizer | seconds | M weights/s |",
        "|---|---|---|",
        f"| ours (`quantizers/bnb4.py`, numpy, 1 thread) | {ours_s:.2f} | "
        f"{result['ours_melem_per_s']} |",
        f"| bitsandbytes `dequantize_4bit` (CPU C kernel, {result['torch_threads']} threads) | "
        f"{bnb_s:.2f} | {result['bitsandbytes_melem_per_s']} |",
        f"| **time, ours / bitsandbytes** | **{result['ours_over_bitsandbytes']}x** | |",
        "",
        f"Ours file to file, as stage `load` runs it (`dequantize_checkpoint`: read the 4-bit "
        f"safetensors, write {written / 1e6:.0f} MB of float32): {file_s:.2f} s, "
        f"{file_s / ours_s:.1f}x the in-memory time.",
        END,
    ])  # fmt: skip
    print(section)
    if args.write_doc:
        write_section(DOC, BEGIN, END, section)


if __name__ == "__main__":
    main()
