"""Hashing and verification throughput next to coreutils ``sha256sum`` on the same files.

Usage: python benchmarks/bench_hashing.py PACKAGE_DIR [--runs 3] [--write-doc]

Measures, each as the best of ``--runs`` (files in the page cache: the first read is untimed),
over the package's files:

* ``sha256sum`` (coreutils, one process over all files): the peer;
* ``sha256_file`` (hashlib, 4 MiB reads): what the manifest, ``verify`` and the cache use;
* ``verify_manifest`` on the package directory: listing, lstat, re-hash, comparison;
* ``package --archive`` (write the reproducible .tar.gz) and ``extract_archive`` +
  ``verify_manifest`` on it (what ``verify PKG.tar.gz --no-generate`` does).

Writes a section of docs/benchmarks.md between its markers with ``--write-doc``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe  # noqa: E402

from rslora_deploy._fsutil import sha256_file  # noqa: E402
from rslora_deploy.archive import extract_archive, write_archive  # noqa: E402
from rslora_deploy.stages.package import package_files, verify_manifest  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_hashing:begin -->", "<!-- bench_hashing:end -->"


def best_of(runs: int, func: Callable[[], object]) -> float:
    """Fastest wall time of ``runs`` calls."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(package: Path, runs: int) -> tuple[int, dict[str, float]]:
    """Total bytes of the package's files and the seconds of each operation."""
    rels, _ = package_files(package)
    files = [package / rel for rel in rels]
    total = sum(p.stat().st_size for p in files)
    for path in files:  # warm the page cache so every run reads from memory
        sha256_file(path)
    seconds: dict[str, float] = {}
    seconds["sha256sum (coreutils)"] = best_of(
        runs,
        lambda: subprocess.run(["sha256sum", *map(str, files)], check=True, capture_output=True),
    )
    seconds["sha256_file (hashlib)"] = best_of(runs, lambda: [sha256_file(p) for p in files])
    seconds["verify_manifest (directory)"] = best_of(runs, lambda: verify_manifest(package))
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "p.tar.gz"
        seconds["write_archive (.tar.gz, level 6)"] = best_of(
            runs, lambda: write_archive(package, archive)
        )
        counter = iter(range(10**6))

        def extract_and_verify() -> None:
            dest = Path(tmp) / f"x{next(counter)}"
            extract_archive(archive, dest)
            assert verify_manifest(dest) == []

        seconds["extract_archive + verify_manifest"] = best_of(runs, extract_and_verify)
    return total, seconds


def main() -> None:
    """Run the measurement and print (or write) the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("package", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write-doc", action="store_true")
    args = parser.parse_args()
    total, seconds = measure(args.package, args.runs)
    peer = seconds["sha256sum (coreutils)"]
    rows = [
        f"| {name} | {sec:.2f} | {total / sec / 1e6:.0f} | {sec / peer:.2f} |"
        for name, sec in seconds.items()
    ]
    section = "\n".join([
        BEGIN,
        f"## Hashing and verification throughput (`python benchmarks/bench_hashing.py`, "
        f"{date.today()})",
        "",
        f"Machine: {describe()}. The CPU was shared with other jobs; best of {args.runs} runs, "
        "files in the page cache.",
        "",
        f"Files: the {len(package_files(args.package)[0])} files of `{args.package.name}` "
        f"({total / 1e6:.0f} MB).",
        "",
        "| operation | seconds | MB/s | time / sha256sum |",
        "|---|---|---|---|",
        *rows,
        END,
    ])  # fmt: skip
    print(section)
    if args.write_doc:
        text = DOC.read_text()
        if BEGIN in text:
            text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        DOC.write_text(text)


if __name__ == "__main__":
    main()
