"""Calibration data for GPTQ and AWQ: token sequences drawn from text with a fixed seed.

Sources: the calibration split of the fetched Brown corpus (default; disjoint from the evaluation
split, see :mod:`rslora_deploy.data.corpus`), or a user file given with ``--calib FILE``:

* ``.txt``: UTF-8 text, one document per block separated by blank lines;
* ``.jsonl``: UTF-8, one JSON object per line with a string field ``text``.

Protocol: with ``rng = numpy.random.default_rng(seed)`` the documents are shuffled, then tokenized
with the model's tokenizer (no special tokens) in that order, joined with the tokenizer's EOS (or a
newline), until the stream holds ``OVERSAMPLE`` times the tokens needed (or the documents run
out). ``samples`` chunks are drawn with the same ``rng``, without replacement, from the
non-overlapping ``seq_len - 1`` token chunks of that stream; every sequence is ``[BOS] + chunk``
when the tokenizer defines a BOS token, else ``seq_len`` tokens of the stream. Tokenizing only
what is needed keeps this stage's overhead small next to the engine (the whole Brown split is
about 1.08 M tokens; a 32 x 256 calibration needs 8 k).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rslora_deploy.errors import CalibrationDataError

logger = logging.getLogger(__name__)

#: Documents shorter than this many characters carry no usable context (headings, page numbers).
MIN_DOC_CHARS = 1
#: Far more text than any calibration needs (Brown's whole calibration split is ~5 MB); the cap
#: bounds what a wrong --calib (a disk image, /dev/zero) can make us read.
MAX_CALIB_BYTES = 256 * 2**20
#: Tokenize until the stream holds this many times the tokens the samples need.
OVERSAMPLE = 4


@dataclass(frozen=True)
class CalibrationSet:
    """Tokenized calibration sequences.

    Attributes:
        input_ids: ``int64`` array ``[samples, seq_len]``.
        source: ``brown:calibration`` or the file path.
        meta: samples, seq_len, source, sha256 of the token array, bos flag, tokens available.
    """

    input_ids: np.ndarray
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    def as_gptqmodel(self) -> list[dict[str, list[int]]]:
        """The list of ``{input_ids, attention_mask}`` dicts ``GPTQModel.quantize`` takes."""
        return [
            {"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in self.input_ids
        ]


def read_calibration_file(path: Path) -> list[str]:
    """Documents of a ``.txt`` or ``.jsonl`` calibration file.

    Raises:
        CalibrationDataError: missing file, another extension, not UTF-8, a bad JSON line, a line
            without a string ``text`` field, or no non-empty document.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise CalibrationDataError(
            f"calibration file {path} has extension {suffix or '(none)'!r}; use a .txt file "
            "(documents separated by blank lines) or a .jsonl file with a 'text' field"
        )
    from rslora_deploy.untrusted import read_limited

    raw = read_limited(path, MAX_CALIB_BYTES, "calibration file", CalibrationDataError)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CalibrationDataError(
            f"calibration file {path} is not UTF-8 (byte {exc.start}: "
            f"{raw[exc.start : exc.start + 1]!r}); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None
    docs = _parse_txt(text) if suffix == ".txt" else _parse_jsonl(text, path)
    docs = [d for d in docs if len(d.strip()) >= MIN_DOC_CHARS]
    if not docs:
        raise CalibrationDataError(
            f"calibration file {path} contains no text; give it at least a few thousand words"
        )
    return docs


def _parse_txt(text: str) -> list[str]:
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks


def _parse_jsonl(text: str, path: Path) -> list[str]:
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise CalibrationDataError(
                f"{path} line {number} is not JSON; each line of a .jsonl file must be an "
                'object like {"text": "..."}'
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibrationDataError(
                f"{path} line {number} has no string 'text' field; each line must be an object "
                'like {"text": "..."}'
            )
        docs.append(record["text"])
    return docs


def brown_documents() -> list[str]:
    """Texts of the Brown calibration split."""
    from rslora_deploy.data.corpus import iter_documents

    return [doc.text for doc in iter_documents("calibration")]


def build_calibration(
    tokenizer: Any, samples: int, seq_len: int, seed: int = 0, path: Path | None = None
) -> CalibrationSet:
    """Tokenize the calibration documents and draw ``samples`` sequences of ``seq_len`` tokens.

    Args:
        tokenizer: a Hugging Face tokenizer of the model being quantized.
        samples: number of sequences.
        seq_len: tokens per sequence, BOS included.
        seed: seed of the chunk sampler.
        path: user calibration file; None uses the Brown calibration split.

    Raises:
        CalibrationDataError: unreadable file, or fewer than ``samples`` chunks of text.
    """
    docs = read_calibration_file(path) if path is not None else brown_documents()
    source = str(path) if path is not None else "brown:calibration"
    bos = tokenizer.bos_token_id
    body = seq_len - 1 if bos is not None else seq_len
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    stream = _token_stream(tokenizer, [docs[i] for i in order], OVERSAMPLE * samples * body)
    n_chunks = len(stream) // body
    if n_chunks < samples:
        raise CalibrationDataError(
            f"calibration text from {source} has {len(stream)} tokens, enough for {n_chunks} "
            f"sequences of {seq_len} tokens but {samples} are needed; add text (at least "
            f"{samples * body} tokens) or lower quantize.calib_samples / calib_seq_len"
        )
    picks = np.sort(rng.choice(n_chunks, size=samples, replace=False))
    rows = [stream[i * body : (i + 1) * body] for i in picks]
    if bos is not None:
        rows = [np.concatenate([[bos], r]) for r in rows]
    ids = np.stack(rows).astype(np.int64)
    digest = hashlib.sha256(ids.tobytes()).hexdigest()
    meta = {
        "samples": samples, "seq_len": seq_len, "source": source, "sha256": digest,
        "seed": seed, "bos": bos is not None, "tokens_tokenized": int(len(stream)),
        "documents": len(docs),
    }  # fmt: skip
    logger.info(
        "calibration: %d x %d tokens from %s (%d tokens tokenized)",
        samples,
        seq_len,
        source,
        len(stream),
    )
    return CalibrationSet(ids, source, meta)


def _token_stream(tokenizer: Any, docs: list[str], wanted: int, batch: int = 16) -> np.ndarray:
    """Tokens of ``docs`` in order, joined by EOS, stopping once ``wanted`` tokens are reached."""
    sep = tokenizer.eos_token_id
    sep_ids = [sep] if sep is not None else tokenizer("\n", add_special_tokens=False)["input_ids"]
    out: list[int] = []
    # Batched calls: the fast tokenizer encodes a list in Rust, several times quicker than a loop.
    for start in range(0, len(docs), batch):
        for ids in tokenizer(docs[start : start + batch], add_special_tokens=False)["input_ids"]:
            out.extend(ids)
            out.extend(sep_ids)
        if len(out) >= wanted:
            break
    return np.asarray(out, dtype=np.int64)
