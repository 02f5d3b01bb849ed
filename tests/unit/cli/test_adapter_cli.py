"""CLI: rslora-deploy merge / adapter inspect|convert on tiny models, good and bad input.

Bad input must exit 1 with one line naming the problem and leave nothing at --out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rslora_deploy.adapters.base_hash import config_sha256, target_weights_sha256
from rslora_deploy.adapters.rslora_writer import RsloraSpec, write_checkpoint
from rslora_deploy.cli.app import main
from rslora_deploy.testing.tiny import save_tiny, tiny_llama
from tests.unit.cli.clean_failure import assert_failed_cleanly

Q = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    base = save_tiny(tiny_llama(), root / "base")
    mods = {Q: {"d_in": 64, "d_out": 64, "layout": "linear"}}
    spec = RsloraSpec(
        modules=mods,
        r=4,
        k=3,
        seed=1,
        task_id="cli",
        base_model={
            "name_or_path": "tiny",
            "architecture": "LlamaForCausalLM",
            "config_sha256": config_sha256(base),
            "target_weights_sha256": target_weights_sha256(base, mods)[0],
        },
    )
    adapter = write_checkpoint(
        root / "adapter", spec, {f"{Q}.rslora_v_A": np.ones(3), f"{Q}.rslora_v_B": np.ones(3)}
    )
    return base, adapter


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_merge_writes_hf_dir(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = setup
    out = tmp_path / "merged"
    code, stdout, err = run(
        capsys,
        "merge",
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--out",
        str(out),
        "--dtype",
        "bfloat16",
        "--format",
        "json",
    )
    assert code == 0, err
    data = json.loads(stdout)
    assert data["dtype"] == "bfloat16"
    assert {"config.json", "model.safetensors", "merge_report.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.tmp")]
    report = json.loads((out / "merge_report.json").read_text())
    assert report["modules"][0]["module"] == Q
    assert report["modules"][0]["out_dtype"] == "bfloat16"


def test_inspect_and_convert(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, adapter = setup
    code, stdout, _ = run(capsys, "adapter", "inspect", str(adapter))
    assert code == 0
    assert "format: rslora-v1" in stdout
    assert "trainable parameters: 6" in stdout
    assert "seed mode" in stdout
    assert "checksums: verified" in stdout
    out = tmp_path / "peft"
    code, _, err = run(
        capsys, "adapter", "convert", str(adapter), "--to", "peft-lora", "--out", str(out)
    )
    assert code == 0, err
    code, stdout, _ = run(capsys, "adapter", "inspect", str(out), "--format", "json")
    assert json.loads(stdout)["format"] == "peft-lora"


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("empty", "E001"),
        ("not_json", "E001"),
        ("pickle", "pickle"),
        ("truncated", "truncated"),
        ("tampered_v", "E002"),
    ],
)
def test_merge_bad_adapter_exit_1_nothing_written(
    setup: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: str,
    needle: str,
) -> None:
    base, good = setup
    bad = tmp_path / "bad"
    bad.mkdir()
    if damage != "empty":
        for f in good.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
    st = bad / "rslora_model.safetensors"
    if damage == "not_json":
        (bad / "rslora_config.json").write_text("{oops")
    elif damage == "pickle":
        import pickle

        st.write_bytes(pickle.dumps({"a": 1}))
    elif damage == "truncated":
        st.write_bytes(st.read_bytes()[:-3])
    elif damage == "tampered_v":
        (bad / "rslora_config.json").write_bytes((bad / "rslora_config.json").read_bytes() + b"\n")
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys, "merge", "--base", str(base), "--adapter", str(bad), "--out", str(out)
    )
    assert_failed_cleanly(code, err, out, needle, only_line=True)


def test_merge_refuses_existing_out_and_missing_base(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = setup
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run(
        capsys, "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)
    )
    assert code == 1
    assert "not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _, err = run(
        capsys,
        "merge",
        "--base",
        str(tmp_path / "nope"),
        "--adapter",
        str(adapter),
        "--out",
        str(tmp_path / "o2"),
    )
    assert code == 1
    assert "config.json" in err
    assert not (tmp_path / "o2").exists()
