"""The offline test assets: a deterministic tiny tokenizer and a Brown-shaped tiny corpus."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from rslora_deploy.testing.tokenizer import SPECIAL_TOKENS, TINY_VOCAB, save_tiny_tokenizer

_HASH_IN_CHILD = (
    "import hashlib, sys, tempfile\n"
    "from pathlib import Path\n"
    "from rslora_deploy.testing.tokenizer import save_tiny_tokenizer\n"
    "d = save_tiny_tokenizer(Path(tempfile.mkdtemp()))\n"
    "print(hashlib.sha256((d / 'tokenizer.json').read_bytes()).hexdigest())\n"
)


def test_tokenizer_is_the_same_in_every_process(tmp_path: Path) -> None:
    """The Rust trainer's hash maps are seeded per process; the vocabulary must not depend on it."""
    here = hashlib.sha256(
        (save_tiny_tokenizer(tmp_path) / "tokenizer.json").read_bytes()
    ).hexdigest()
    child = subprocess.run(
        [sys.executable, "-c", _HASH_IN_CHILD], capture_output=True, text=True, check=True
    )
    assert child.stdout.strip() == here


def test_tokenizer_ids_fit_the_tiny_models(tokenizer) -> None:
    from rslora_deploy.testing.text import TEXT

    assert len(tokenizer) == TINY_VOCAB
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert max(ids) < TINY_VOCAB
    # Merges were learned: fewer tokens than bytes.
    assert len(ids) < len(TEXT.encode()) * 0.7
    assert tokenizer.decode(ids) == TEXT


def test_too_large_a_vocabulary_is_refused() -> None:
    from rslora_deploy.testing.tokenizer import build_tiny_tokenizer

    with pytest.raises(ValueError, match="smaller vocab_size"):
        build_tiny_tokenizer(100_000)


def test_unit_session_reads_the_tiny_corpus(tiny_cache: Path) -> None:
    """The default calibration/evaluation text of unit tests is the built-in text, not Brown."""
    from rslora_deploy.data.assets import brown_dir
    from rslora_deploy.data.corpus import iter_documents
    from rslora_deploy.testing.text import PARAGRAPHS

    assert brown_dir() == tiny_cache / "corpora" / "brown"
    texts = {p for _, p in PARAGRAPHS}
    calibration = [d.text for d in iter_documents("calibration")]
    evaluation = list(iter_documents("evaluation"))
    assert set(calibration) <= texts
    assert evaluation
    assert {d.text for d in evaluation} <= texts
    assert all(d.genre for d in evaluation)
