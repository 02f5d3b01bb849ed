"""Write a benchmark's section into a docs page between its begin/end markers."""

from __future__ import annotations

from pathlib import Path


def write_section(doc: Path, begin: str, end: str, section: str) -> None:
    """Replace the text from ``begin`` to ``end`` in ``doc`` with ``section`` (or append it).

    ``section`` starts with ``begin`` and ends with ``end``, so a rerun finds and replaces it.
    """
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\n"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.write_text(text)
