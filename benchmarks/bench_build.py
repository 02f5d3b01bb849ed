"""Time each stage of the default build (wall time, peak RSS) and write docs/benchmarks.md.

Usage: python benchmarks/bench_build.py [--profile t4-2gb] [--out out/bench] [--runs 1]

It runs exactly what ``make demo`` runs (the default recipe, the embedded demo adapter), through
``rslora_deploy.api.build``, and reads the per-stage records the build measures itself (RSS of this
process and its children sampled every 0.1 s: see rslora_deploy/stages/base.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _docs import write_section  # noqa: E402
from _machine import describe  # noqa: E402

from rslora_deploy.api import build  # noqa: E402
from rslora_deploy.config import make_config  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_build:begin -->", "<!-- bench_build:end -->"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="t4-2gb")
    parser.add_argument("--out", default="out/bench-build")
    args = parser.parse_args()
    config = make_config({"profile": args.profile, "out": args.out, "overwrite": True})
    start = time.perf_counter()
    result = build(config)
    total = time.perf_counter() - start
    rows = [
        f"| {r.name} | {r.seconds:.1f} | {r.peak_rss_bytes / 2**20:.0f} |" for r in result.stages
    ]
    quality = result.manifest.get("quality", {})
    section = "\n".join([
        BEGIN,
        f"## Default build, stage by stage (`python benchmarks/bench_build.py`, {date.today()})",
        "",
        f"Machine: {describe()}.",
        "",
        f"Profile {args.profile}; recipe: defaults (GPTQ int4 g{config.quantize.group_size}, "
        f"{config.quantize.calib_samples} x {config.quantize.calib_seq_len} calibration tokens, "
        f"eval {config.eval.windows} x {config.eval.window_len}).",
        "",
        "| stage | wall s | peak RSS MiB (process + children) |",
        "|---|---|---|",
        *rows,
        f"| **total** | {total:.1f} | |",
        "",
        f"Package: estimate {result.budget.estimate_bytes / 2**20:.1f} MiB of "
        f"{result.budget.budget_bytes / 2**20:.0f} MiB, fits={result.fits}; "
        f"weights {result.budget.terms_bytes['weights'] / 2**20:.1f} MiB. "
        f"Quality: {json.dumps(quality)}",
        END,
    ])  # fmt: skip
    write_section(DOC, BEGIN, END, section)
    print(section)


if __name__ == "__main__":
    main()
