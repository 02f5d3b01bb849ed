"""Calibration data: file formats, bad inputs, determinism, BOS."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rslora_deploy.data.calibration import build_calibration, read_calibration_file
from rslora_deploy.errors import CalibrationDataError

PARAGRAPH = (
    "The committee met on Tuesday to discuss the budget for the coming year, and after a long "
    "debate it agreed to raise the allowance for schools while cutting the cost of roads. "
)


def test_txt_blocks(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first doc\nline two\n\n\n  \nsecond doc\n\nthird", encoding="utf-8")
    assert read_calibration_file(path) == ["first doc\nline two", "second doc", "third"]


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b", "id": 3}\n', encoding="utf-8")
    assert read_calibration_file(path) == ["a", "b"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("c.csv", b"text\nhello", "extension '.csv'"),
        ("c.txt", b"", "contains no text"),
        ("c.txt", b"\n\n   \n", "contains no text"),
        ("c.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"), "not UTF-8 .*iconv"),
        ("c.jsonl", b'{"text": "ok"}\nnot json\n', "line 2 is not JSON"),
        ("c.jsonl", b'{"content": "x"}\n', "line 1 has no string 'text' field"),
        ("c.jsonl", b'{"text": 5}\n', "line 1 has no string 'text' field"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CalibrationDataError, match=message):
        read_calibration_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(CalibrationDataError, match="cannot read"):
        read_calibration_file(tmp_path / "nope.txt")


def test_too_short(tmp_path, tokenizer):
    path = tmp_path / "c.txt"
    path.write_text(PARAGRAPH, encoding="utf-8")
    with pytest.raises(CalibrationDataError, match=r"enough for 0 sequences of 128 tokens but 4"):
        build_calibration(tokenizer, samples=4, seq_len=128, path=path)


def test_user_file_bos_and_determinism(tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": PARAGRAPH * 3}) for _ in range(20)))
    a = build_calibration(tokenizer, samples=6, seq_len=32, seed=0, path=path)
    b = build_calibration(tokenizer, samples=6, seq_len=32, seed=0, path=path)
    c = build_calibration(tokenizer, samples=6, seq_len=32, seed=1, path=path)
    assert a.input_ids.shape == (6, 32)
    assert (a.input_ids[:, 0] == tokenizer.bos_token_id).all()
    assert a.meta["sha256"] == b.meta["sha256"] != c.meta["sha256"]
    assert a.meta["source"] == str(path)
    assert a.meta["bos"] is True
    rows = a.as_gptqmodel()
    assert rows[0]["attention_mask"] == [1] * 32
    assert rows[0]["input_ids"] == a.input_ids[0].tolist()


def test_default_brown_source(tokenizer):
    calib = build_calibration(tokenizer, samples=4, seq_len=64, seed=0)
    assert calib.source == "brown:calibration"
    # Only about OVERSAMPLE x the needed tokens are tokenized, not the whole split.
    assert 4 * 4 * 63 <= calib.meta["tokens_tokenized"] < 50_000
    # Non-overlapping chunks: no two sequences are identical.
    assert len({row.tobytes() for row in calib.input_ids}) == 4
    assert np.issubdtype(calib.input_ids.dtype, np.integer)
