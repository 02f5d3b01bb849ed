"""Hostile profiles, recipes and calibration files given to ``rslora-deploy build``.

Each fails in the first second of a build (profile and recipe parsing, then the ``load`` stage
reads ``--calib``), before any model is loaded, with one line naming the file and the field.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from rslora_deploy.profiles import profiles_dir
from tests.unit.cli.clean_failure import assert_clean_failure

GOOD_PROFILE = (profiles_dir() / "t4-2gb.toml").read_text()


def _profile_without(key: str) -> str:
    return "\n".join(ln for ln in GOOD_PROFILE.splitlines() if not ln.startswith(f"{key} "))


def _profile_with(key: str, value: str) -> str:
    return _profile_without(key) + f"\n{key} = {value}\n"


PROFILE_CASES: dict[str, tuple[str | bytes, tuple[str, ...]]] = {
    "profile-not-toml": ("device = cuda\n[[[", ("not valid TOML",)),
    "profile-not-utf8": (b"description = '\xff'", ("not valid TOML",)),
    "profile-too-large": ("# pad\n" * 200_000 + GOOD_PROFILE, ("limit",)),
    "profile-memory-string": (_profile_with("memory_bytes", '"lots"'), ("memory_bytes",)),
    "profile-memory-negative": (_profile_with("memory_bytes", "-1"), ("memory_bytes",)),
    "profile-missing-field": (_profile_without("max_seq_len"), ("max_seq_len", "required")),
    "profile-unknown-field": (GOOD_PROFILE + "\nturbo = true\n", ("turbo",)),
    "profile-bits-wrong-type": (_profile_with("supported_bits", '"four"'), ("supported_bits",)),
}


@pytest.mark.parametrize("case", sorted(PROFILE_CASES))
def test_hostile_profile(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content, needles = PROFILE_CASES[case]
    profile = tmp_path / "device.toml"
    profile.write_bytes(content.encode() if isinstance(content, str) else content)
    out = tmp_path / "out"
    argv = ["build", "--profile", str(profile), "--no-adapter", "--out", str(out)]
    assert_clean_failure(argv, capsys, out, str(profile), *needles)


RECIPE_CASES: dict[str, tuple[str | bytes, tuple[str, ...]]] = {
    "recipe-not-toml": ("[quantize\nmethod = 'rtn'", ("not valid TOML",)),
    "recipe-not-utf8": (b"[quantize]\nmethod = '\xfe'", ("not valid TOML",)),
    "recipe-too-large": ("#" * (2 << 20), ("limit",)),
    "recipe-unknown-section": ("[turbo]\nenabled = true\n", ("turbo",)),
    "recipe-unknown-key": ("[quantize]\nbitz = 4\n", ("quantize.bitz",)),
    "recipe-group-size-string": ("[quantize]\ngroup_size = 'big'\n", ("quantize.group_size",)),
    "recipe-bits-3": ("[quantize]\nbits = 3\n", ("bits must be 4 or 8",)),
    "recipe-samples-zero": ("[quantize]\ncalib_samples = 0\n", ("quantize.calib_samples",)),
    "recipe-method-unknown": ("[quantize]\nmethod = 'magic'\n", ("quantize.method",)),
    "recipe-section-is-value": ("quantize = 5\n", ("quantize",)),
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_hostile_recipe(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content, needles = RECIPE_CASES[case]
    recipe = tmp_path / "recipe.toml"
    recipe.write_bytes(content.encode() if isinstance(content, str) else content)
    out = tmp_path / "out"
    argv = ["build", "--profile", "t4-2gb", "--recipe", str(recipe), "--out", str(out)]
    assert_clean_failure(argv, capsys, out, *needles)


def _sparse(size: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        with path.open("wb") as handle:
            handle.truncate(size)

    return make


def _write(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


CALIB_CASES: dict[str, tuple[str, Callable[[Path], None], tuple[str, ...]]] = {
    "calib-empty": ("c.txt", _write(b""), ("contains no text",)),
    "calib-blank-lines": ("c.txt", _write(b"\n\n  \n"), ("contains no text",)),
    "calib-not-utf8": ("c.txt", _write("na\u00efve".encode("latin-1") * 50), ("not UTF-8",)),
    "calib-jsonl-not-json": ("c.jsonl", _write(b"plain text\n"), ("line 1 is not JSON",)),
    "calib-jsonl-no-text": ("c.jsonl", _write(b'{"body": "x"}\n'), ("line 1", "'text'")),
    "calib-jsonl-text-number": ("c.jsonl", _write(b'{"text": 5}\n'), ("line 1", "'text'")),
    "calib-wrong-extension": ("c.docx", _write(b"PK\x03\x04"), ("use a .txt file",)),
    "calib-missing": ("c.txt", lambda p: None, ("does not exist",)),
    "calib-is-a-directory": ("c.txt", lambda p: p.mkdir(), ("is a directory",)),
    "calib-is-a-fifo": ("c.txt", lambda p: os.mkfifo(p), ("not a regular file",)),
    "calib-too-large": ("c.txt", _sparse(300 * 2**20), ("limit",)),
}


@pytest.mark.parametrize("case", sorted(CALIB_CASES))
def test_hostile_calibration(
    case: str, small_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, make, needles = CALIB_CASES[case]
    calib = tmp_path / name
    make(calib)
    out = tmp_path / "out"
    argv = ["build", "--profile", "t4-2gb", "--base", str(small_base), "--method", "gptq"]
    argv += ["--calib", str(calib), "--out", str(out)]
    assert_clean_failure(argv, capsys, out, str(calib), *needles)


ADAPTER_CASES: dict[str, tuple[str, bytes, tuple[str, ...]]] = {
    "peft-config-too-large": ("adapter_config.json", b" " * (17 * 2**20) + b"{}", ("limit",)),
    "peft-config-is-a-list": ("adapter_config.json", b"[]", ("expected a JSON object",)),
    "rslora-config-too-large": ("rslora_config.json", b" " * (17 * 2**20) + b"{}", ("limit",)),
    "rslora-config-not-json": ("rslora_config.json", b"{format", ("not valid JSON",)),
}


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_hostile_adapter_config(
    case: str, small_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, content, needles = ADAPTER_CASES[case]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / name).write_bytes(content)
    if name.startswith("rslora"):  # a valid, empty weights file: the config is what is broken
        (adapter / "rslora_model.safetensors").write_bytes(b"\x02" + b"\0" * 7 + b"{}")
    out = tmp_path / "out"
    argv = ["build", "--profile", "t4-2gb", "--base", str(small_base), "--adapter", str(adapter)]
    assert_clean_failure([*argv, "--out", str(out)], capsys, out, name, *needles)
