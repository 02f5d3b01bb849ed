"""The default build before and after a change, in one run: stage times, package and model/ bytes.

Usage: python benchmarks/bench_build_ab.py --before REV [--after WORKTREE] [--runs 1]
       [--profile t4-2gb] [--out out/bench-ab] [--set SECTION.KEY=JSON ...]

``--before`` is a git revision of this repository; it is checked out into a temporary git worktree
(removed at the end). ``--after`` is a source tree, by default this one. Each build runs what
``make demo`` runs (``api.build`` on the default recipe, the embedded demo adapter) with the stage
cache off, in a child process of the same virtual environment whose ``PYTHONPATH`` puts that tree
first, so both sides use the same libraries and assets and differ only in this package's code.
Runs alternate (before, after, before, after...) so a machine that slows down over the run does not
bias one side.

It prints and records (``benchmarks/results/build_ab.json``, and a section of docs/benchmarks.md):
per-stage wall time of each side (the median over runs) with after/before ratios, the bytes of each
top-level folder of the package, and whether ``model/`` is byte-identical (every file's sha256),
naming the files that differ. Take it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _docs import write_section  # noqa: E402
from _machine import describe  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
RESULTS = REPO / "benchmarks" / "results" / "build_ab.json"
BEGIN, END = "<!-- bench_build_ab:begin -->", "<!-- bench_build_ab:end -->"

# Run in the child: one cold build (no stage cache), its stage records as JSON on the last line.
_CHILD = """
import json, sys, time
from rslora_deploy.api import build
from rslora_deploy.config import make_config
data = {"profile": sys.argv[1], "out": sys.argv[2], "overwrite": True}
for setting in sys.argv[3:]:  # section.key=JSON value
    key, _, value = setting.partition("=")
    section, _, field = key.partition(".")
    data.setdefault(section, {})[field] = json.loads(value)
config = make_config(data)
start = time.perf_counter()
result = build(config, cache=False)
total = time.perf_counter() - start
stages = {r.name: r.seconds for r in result.stages}
print(json.dumps({"stages": stages, "total": round(total, 3), "fits": result.fits}))
"""


def _build(tree: Path, profile: str, out: Path, settings: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, profile, str(out), *settings],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"build in {tree} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _folder_bytes(package: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for p in package.rglob("*"):
        if p.is_file():
            parts = p.relative_to(package).parts
            top = parts[0] + ("/" if len(parts) > 1 else "")
            sizes[top] = sizes.get(top, 0) + p.stat().st_size
    return dict(sorted(sizes.items()))


def _median_stages(runs: list[dict[str, Any]]) -> dict[str, float]:
    names = list(runs[0]["stages"])
    medians = {n: statistics.median(float(r["stages"][n]) for r in runs) for n in names}
    # "total" is the whole build() call, load included (the stages' sum misses the staging work).
    medians["total"] = statistics.median(float(r["total"]) for r in runs)
    return medians


def _ratio(before: float, after: float) -> str:
    # Sub-second stages (load, budget, package) are timer noise as a ratio.
    return f"{after / before:.2f}" if before >= 0.5 else "(under 0.5 s)"


def _section(report: dict[str, Any]) -> str:
    before, after = report["before_s"], report["after_s"]
    # A stage only one side has (renamed or added) is shown with a dash on the other.
    names = [*before, *(n for n in after if n not in before)]
    rows = [
        f"| {n} | {before[n]:.1f} | {after[n]:.1f} | {_ratio(before[n], after[n])} |"
        if n in before and n in after
        else f"| {n} | {before.get(n, '-')} | {after.get(n, '-')} | |"
        for n in names
    ]
    sizes_b, sizes_a = report["before_bytes"], report["after_bytes"]
    size_rows = [
        f"| {top} | {sizes_b.get(top, 0)} | {sizes_a.get(top, 0)} |"
        for top in sorted(set(sizes_b) | set(sizes_a))
    ]
    differ = report["model_files_differing"]
    identical = "byte-identical" if not differ else f"DIFFERENT in {differ}"
    return "\n".join([
        BEGIN,
        f"## Default build before and after a change (`python benchmarks/bench_build_ab.py "
        f"--before {report['before_rev']}`, {report['date']})",
        "",
        f"Machine: {report['machine']}.",
        "",
        f"Profile {report['profile']}, recipe: "
        f"{', '.join(report['settings']) or 'the default (`make demo`)'}, stage cache off, "
        f"{report['runs']} run(s) per side, alternating; median wall seconds. Before: "
        f"`{report['before_rev']}`; after: `{report['after_rev']}`.",
        "",
        "| stage | before s | after s | after / before |",
        "|---|---|---|---|",
        *rows,
        "",
        "| package folder | before bytes | after bytes |",
        "|---|---|---|",
        *size_rows,
        "",
        f"`model/` ({report['model_files']} files): {identical}.",
        END,
    ])  # fmt: skip


def _record(report: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    section = _section(report)
    write_section(DOC, BEGIN, END, section)
    print(section)


def _rev(tree: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    )
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return out.stdout.strip() + ("+changes" if dirty else "")


def main() -> None:
    """Run the A/B builds and record the comparison."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True, help="git revision of the 'before' side")
    parser.add_argument("--after", type=Path, default=REPO, help="source tree of the 'after' side")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--profile", default="t4-2gb")
    parser.add_argument("--out", type=Path, default=Path("out/bench-ab"))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=JSON",
        help="recipe setting for both sides, e.g. eval.enabled=false (default: none, the demo)",
    )
    args = parser.parse_args()
    out = args.out.resolve()
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        before_tree = Path(tmp) / "before"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(before_tree),
             args.before],
            check=True,
        )  # fmt: skip
        try:
            sides = {"before": before_tree, "after": args.after.resolve()}
            runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
            for i in range(args.runs):
                for side, tree in sides.items():
                    print(f"run {i + 1}/{args.runs}: {side} ({tree})", flush=True)
                    runs[side].append(_build(tree, args.profile, out / side, args.set))
            digests = {side: _tree_digest(out / side / "model") for side in sides}
            differ = sorted(
                name
                for name in set(digests["before"]) | set(digests["after"])
                if digests["before"].get(name) != digests["after"].get(name)
            )
            report: dict[str, Any] = {
                "date": str(date.today()),
                "machine": describe(),
                "profile": args.profile,
                "runs": args.runs,
                "settings": args.set,
                "before_rev": _rev(before_tree),
                "after_rev": _rev(sides["after"]),
                "before_s": _median_stages(runs["before"]),
                "after_s": _median_stages(runs["after"]),
                "raw": runs,
                "before_bytes": _folder_bytes(out / "before"),
                "after_bytes": _folder_bytes(out / "after"),
                "model_files": len(digests["after"]),
                "model_files_differing": differ,
            }
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(before_tree)],
                check=False,
            )
    _record(report)


if __name__ == "__main__":
    main()
