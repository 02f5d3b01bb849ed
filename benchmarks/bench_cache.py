"""The demo build three times: without the cache, filling it, and from it. Times and file hashes.

Usage: python benchmarks/bench_cache.py [--profile t4-2gb] [--work out/bench-cache] [--write-doc]
       [-- EXTRA BUILD FLAGS]   (e.g. -- --base DIR --recipe R.toml: another pipeline than the demo)

Each build is the CLI in its own process (``rslora-deploy build --profile P`` on the embedded
defaults, what ``make demo`` runs), so a time includes Python start-up and imports like a user's:

* A: ``--no-cache`` (cold);
* B: an empty stage cache (cold; fills it);
* C: the same command again (warm: every cached stage reused).

Reported: the three wall times, C / B (the issue's target: under 10%), and which package files
differ between A and B (two cold builds: reproducibility) and between B and C (cache fidelity).
The stage cache lives under ``--work`` (``RSLORA_DEPLOY_STAGE_CACHE``), never in the user's cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe  # noqa: E402

from rslora_deploy._fsutil import sha256_file  # noqa: E402
from rslora_deploy.stages.package import package_files  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BENCH_DOC = ROOT / "docs" / "benchmarks.md"
REPRO_DOC = ROOT / "docs" / "reproducibility.md"
BEGIN, END = "<!-- bench_cache:begin -->", "<!-- bench_cache:end -->"
REPRO_BEGIN, REPRO_END = "<!-- repro-demo:begin -->", "<!-- repro-demo:end -->"


def run(name: str, work: Path, profile: str, *flags: str) -> tuple[float, Path]:
    """One build in a child process; returns (wall seconds, package dir)."""
    out = work / name
    env = {**os.environ, "RSLORA_DEPLOY_STAGE_CACHE": str(work / "stage-cache")}
    argv = [sys.executable, "-m", "rslora_deploy.cli.app", "build", "--profile", profile,
            "--out", str(out), "--overwrite", *flags]  # fmt: skip
    start = time.perf_counter()
    with (work / f"{name}.log").open("w") as log:
        subprocess.run(argv, env=env, stderr=log, stdout=log, check=True)
    return time.perf_counter() - start, out


def differing(a: Path, b: Path) -> list[str]:
    """Package files whose bytes differ between two packages (or exist in one only)."""
    files_a, files_b = set(package_files(a)[0]), set(package_files(b)[0])
    out = sorted(files_a ^ files_b)
    for rel in sorted(files_a & files_b):
        if sha256_file(a / rel) != sha256_file(b / rel):
            out.append(rel)
    return out


def _replace(doc: Path, begin: str, end: str, section: str) -> None:
    text = doc.read_text()
    if begin in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)


def main() -> None:
    """Run the three builds and print (or write) the results."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="t4-2gb")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench-cache")
    parser.add_argument("--write-doc", action="store_true")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then extra build flags")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    load_before = os.getloadavg()[0]
    t_a, pkg_a = run("a-nocache", args.work, args.profile, "--no-cache", *extra)
    t_b, pkg_b = run("b-cold", args.work, args.profile, *extra)
    t_c, pkg_c = run("c-warm", args.work, args.profile, *extra)
    what = f"`build --profile {args.profile} {' '.join(extra)}`".replace(" `", "`")
    named = [
        e["path"] for e in json.loads((pkg_b / "manifest.json").read_text())["nondeterministic"]
    ]
    cold_diff, warm_diff = differing(pkg_a, pkg_b), differing(pkg_b, pkg_c)
    n_files = len(package_files(pkg_b)[0])
    loads = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    machine = f"Machine: {describe()}. 1-minute load average {loads} the three builds."
    bench = "\n".join([
        BEGIN,
        f"## Stage cache: warm rerun of {what} (`python benchmarks/bench_cache.py`, "
        f"{date.today()})",
        "",
        machine,
        "",
        "| build | wall s | vs cold |",
        "|---|---|---|",
        f"| A: `--no-cache` | {t_a:.1f} | {t_a / t_b:.2f} |",
        f"| B: cold, empty cache (fills it) | {t_b:.1f} | 1.00 |",
        f"| C: warm, every stage cached | {t_c:.1f} | **{t_c / t_b:.3f}** |",
        "",
        f"Warm / cold = {100 * t_c / t_b:.1f}% (target: under 10%). Files differing B vs C: "
        f"{', '.join(warm_diff) or 'none'}.",
        END,
    ])  # fmt: skip
    repro = "\n".join([
        REPRO_BEGIN,
        f"Measured with `python benchmarks/bench_cache.py` ({date.today()}): "
        f"two cold builds (A without the cache, B filling it) of {what}; "
        f"of the package's {n_files} files, those whose bytes differ: "
        f"{', '.join(f'`{p}`' for p in cold_diff) or 'none'}; named as nondeterministic in the "
        f"manifest: {', '.join(f'`{p}`' for p in named) or 'none'}. Manifests "
        f"{'identical' if 'manifest.json' not in cold_diff else 'DIFFER'}. {machine}",
        REPRO_END,
    ])  # fmt: skip
    print(bench + "\n\n" + repro)
    if args.write_doc:
        _replace(BENCH_DOC, BEGIN, END, bench)
        _replace(REPRO_DOC, REPRO_BEGIN, REPRO_END, repro)


if __name__ == "__main__":
    main()
