"""A three-adapter package on the real SmolLM2: one int4 base, adapters switched at run time.

The adapters are the embedded RS-LoRA demo adapter (rank 64, every projection), a PEFT LoRA
(rank 8, q/v) and a PEFT VeRA adapter (rank 32, the MLP), so the package mixes three formats,
three target sets and three ranks. One cpu-2gb package is built for the module and shared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

PROMPT_IDS_LEN = 200


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> dict[str, Path]:
    """name -> directory of the three adapters (PEFT's own save_pretrained for LoRA and VeRA)."""
    from rslora_deploy.adapters import demo_adapter_dir
    from rslora_deploy.testing.adapters import random_peft_adapter

    root = tmp_path_factory.mktemp("adapters")
    lora = random_peft_adapter(
        smollm2_dir, root / "lora", "lora", r=8, targets=["q_proj", "v_proj"], seed=1, std=0.05
    )
    vera = random_peft_adapter(
        smollm2_dir,
        root / "vera",
        "vera",
        r=32,
        targets=["gate_proj", "up_proj", "down_proj"],
        seed=2,
        std=0.5,
    )
    return {"demo": demo_adapter_dir(), "lora_qv": lora, "vera_mlp": vera}


def _recipe(adapters: dict[str, Path]) -> str:
    lines = [
        '[quantize]\nmethod = "rtn"\n',
        "[eval]\nenabled = false\n",
        "[package]\nkeep_quantized_checkpoint = true\n",
    ]
    for name, path in adapters.items():
        lines.append(f'[[adapters]]\nname = "{name}"\npath = "{path}"\n')
    return "\n".join(lines)


@pytest.fixture(scope="module")
def cpu_package(
    tmp_path_factory: pytest.TempPathFactory, build_package, adapter_dirs: dict[str, Path]
) -> Path:
    return build_package(tmp_path_factory.mktemp("multi-cpu"), _recipe(adapter_dirs), "cpu-2gb")


def _manifest(package: Path) -> dict:
    return json.loads((package / "manifest.json").read_text())


def test_the_package_lists_every_adapter_and_verify_checks_them(cpu_package: Path) -> None:
    from rslora_deploy.cli.app import main

    records = {a["name"]: a for a in _manifest(cpu_package)["adapters"]}
    assert list(records) == ["demo", "lora_qv", "vera_mlp"]
    assert {r["format"] for r in records.values()} == {"rslora-v1", "peft-lora", "peft-vera"}
    assert records["lora_qv"]["targets"] == ["q_proj", "v_proj"]
    assert records["demo"]["ranks"] == [64]
    assert records["lora_qv"]["ranks"] == [8]
    for record in records.values():
        assert (cpu_package / record["file"]).stat().st_size == record["bytes"]
        assert (cpu_package / record["source"]).is_dir()
    assert main(["verify", str(cpu_package), "--no-generate"]) == 0


def _deltas(adapter_dir: Path) -> list:
    from rslora_deploy.adapters.detect import load_adapter

    return load_adapter(adapter_dir).deltas


def _lora_inputs(package: Path, name: str) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    record = next(a for a in _manifest(package)["adapters"] if a["name"] == name)
    fmt = ort.AdapterFormat.read_adapter(str(package / record["file"]))
    # Copies: an OrtValue's numpy() view dies with the AdapterFormat that owns it.
    return {k: np.array(v.numpy(), copy=True) for k, v in fmt.get_parameters().items()}


def test_each_adapter_matches_the_dequantized_base_plus_its_exact_delta(
    cpu_package: Path, adapter_dirs: dict[str, Path]
) -> None:
    """Relative logit error on 8 x 512 windows, per adapter, within the export's parity limit.

    The limit is the export's ``parity_tolerance``, or the base graph's own error against the
    same reference where that is larger (+10%): the int8 activations of accuracy level 4 put the
    RTN base itself at about 0.17 on these windows, and the fp32 branch must add nothing to it.
    """
    import torch
    from transformers import AutoTokenizer

    from rslora_deploy.adapters.merge_math import merge_deltas
    from rslora_deploy.evaluation.quality import eval_windows, load_torch_model, onnx_logits

    tolerance = _manifest(cpu_package)["export"]["parity_tolerance"]
    tokenizer = AutoTokenizer.from_pretrained(cpu_package / "model")
    windows = eval_windows(tokenizer, 8, 512).input_ids
    errors = {}
    for name in ["base", *adapter_dirs]:
        model = load_torch_model(cpu_package / "quantized").eval()
        if name != "base":
            merge_deltas(model, _deltas(adapter_dirs[name]), untie=False)
        feeds = {} if name == "base" else _lora_inputs(cpu_package, name)
        run_onnx = onnx_logits(cpu_package / "model", feeds)
        num = den = 0.0
        for ids in windows:
            with torch.inference_mode():
                ref = model(torch.from_numpy(ids[None, :])).logits[0].float().numpy()
            got = run_onnx(ids)
            num += float(np.sum((got.astype(np.float64) - ref) ** 2))
            den += float(np.sum(ref.astype(np.float64) ** 2))
        errors[name] = (num / den) ** 0.5
    limit = max(tolerance, 1.1 * errors["base"])
    assert all(error <= limit for error in errors.values()), (errors, limit)


def _runner_logits(package: Path, ids: np.ndarray, names: list[str]) -> list[np.ndarray]:
    from rslora_deploy.exporters.genai.adapter_runner import AdapterPackage

    runner = AdapterPackage(package)
    return [runner.prefill_logits(ids, name) for name in names]


def _ids(package: Path) -> np.ndarray:
    from transformers import AutoTokenizer

    from rslora_deploy.testing.text import TEXT

    tokenizer = AutoTokenizer.from_pretrained(package / "model")
    return np.asarray(tokenizer(TEXT)["input_ids"][:PROMPT_IDS_LEN], dtype=np.int32)


def test_switching_in_one_process_equals_a_fresh_process_per_adapter(
    cpu_package: Path, tmp_path: Path
) -> None:
    ids = _ids(cpu_package)
    order = ["demo", "lora_qv", "base", "demo", "vera_mlp"]
    switched = _runner_logits(cpu_package, ids, order)
    np.save(tmp_path / "ids.npy", ids)
    for step, name in enumerate(order):
        code = (
            "import sys, numpy as np; from pathlib import Path; "
            "from rslora_deploy.exporters.genai.adapter_runner import AdapterPackage; "
            f"r = AdapterPackage(Path({str(cpu_package)!r})); "
            f"ids = np.load({str(tmp_path / 'ids.npy')!r}); "
            f"np.save({str(tmp_path / 'fresh.npy')!r}, r.prefill_logits(ids, {name!r}))"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
        fresh = np.load(tmp_path / "fresh.npy")
        np.testing.assert_array_equal(switched[step], fresh, err_msg=f"step {step}: {name}")
    assert not np.array_equal(switched[0], switched[2]), "the demo adapter changes nothing"
    assert not np.array_equal(switched[1], switched[2]), "the LoRA adapter changes nothing"


def test_each_adapter_changes_the_greedy_tokens_where_its_merged_model_does(
    cpu_package: Path, adapter_dirs: dict[str, Path]
) -> None:
    """Where the fp32 merged model's greedy text differs from the fp32 base's, so does ours."""
    import torch

    from rslora_deploy.adapters.merge_math import merge_deltas
    from rslora_deploy.evaluation.quality import load_torch_model
    from rslora_deploy.exporters.genai.adapter_runner import AdapterPackage

    runner = AdapterPackage(cpu_package)
    ids = runner.tokenizer.encode("The capital of France is")
    base_tokens = runner.generate("The capital of France is", "base", 16)["tokens"]

    def greedy(model) -> list[int]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([list(ids)]), max_new_tokens=16, do_sample=False)
        return out[0, len(ids) :].tolist()

    reference_base = greedy(load_torch_model(cpu_package / "quantized").eval())
    for name, directory in adapter_dirs.items():
        merged = load_torch_model(cpu_package / "quantized").eval()
        merge_deltas(merged, _deltas(directory))
        if greedy(merged) != reference_base:
            assert runner.generate("The capital of France is", name, 16)["tokens"] != base_tokens


def test_rs_lora_adapter_rebuilt_on_a_torch_free_device_is_byte_identical(
    cpu_package: Path, tmp_path: Path
) -> None:
    """The shipped runner, its vendored modules, numpy and onnxruntime only: torch is blocked."""
    out = tmp_path / "demo.onnx_adapter"
    code = (
        "import runpy, sys\n"
        "for m in ('torch', 'transformers', 'pydantic', 'peft', 'gptqmodel'):\n"
        "    sys.modules[m] = None\n"
        f"sys.argv = ['run_adapters.py', 'rebuild', {str(cpu_package)!r}, 'demo', {str(out)!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(cpu_package / 'runner' / 'run_adapters.py')!r}, "
        "run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0, stop.code\n"
        "print(sys.modules['rslora_deploy'].__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith(str(cpu_package / "runner"))
    shipped = cpu_package / "adapters" / "demo.onnx_adapter"
    assert out.read_bytes() == shipped.read_bytes()


def test_run_refuses_an_adapter_file_from_another_base_build(
    cpu_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The model_version check: an adapter made for a different graph is exit 1, named."""
    import shutil

    from rslora_deploy.cli.app import main
    from rslora_deploy.exporters.genai.adapter_inputs import write_adapter_file

    params = _lora_inputs(cpu_package, "lora_qv")
    other = tmp_path / "other.onnx_adapter"
    write_adapter_file(params, other, model_version=12345)
    code = main(["run", str(cpu_package), "--adapter", "lora_qv", "--adapter-file", str(other)])
    err = capsys.readouterr().err
    assert code == 1
    assert "lora_qv" in err
    assert "another base build" in err
    assert "Traceback" not in err
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("name", "model.layers.0.attn.qkv_proj.lora_C"),
        ("rank", "model.layers.0.attn.qkv_proj"),
        ("dtype", "model.layers.0.attn.qkv_proj.lora_A"),
    ],
)
def test_an_adapter_file_that_does_not_fit_the_graph_is_refused_naming_the_input(
    cpu_package: Path, tmp_path: Path, damage: str, named: str
) -> None:
    """The check the build runs on every file it writes (and verify reruns)."""
    from rslora_deploy.exporters.genai.adapter_inputs import (
        AdapterInputError,
        check_adapter_file,
        graph_version,
        write_adapter_file,
    )

    model = cpu_package / "model" / "model.onnx"
    params = _lora_inputs(cpu_package, "lora_qv")
    a, b = "model.layers.0.attn.qkv_proj.lora_A", "model.layers.0.attn.qkv_proj.lora_B"
    if damage == "name":
        params["model.layers.0.attn.qkv_proj.lora_C"] = params.pop(a)
    elif damage == "rank":
        params[b] = params[b][:-1]
    else:
        params[a] = params[a].astype(np.float16)
    path = tmp_path / "bad.onnx_adapter"
    write_adapter_file(params, path, graph_version(model))
    with pytest.raises(AdapterInputError, match=named.replace(".", r"\.")) as info:
        check_adapter_file(path, model, "bad")
    assert "'bad'" in str(info.value)


def test_an_adapter_for_another_model_fails_the_build_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PEFT LoRA shaped for the tiny Llama: exit 1 at load, nothing at --out."""
    from rslora_deploy.cli.app import main
    from rslora_deploy.testing.adapters import random_peft_adapter
    from rslora_deploy.testing.tiny import tiny_llama_dir

    tiny = tiny_llama_dir(tmp_path / "tiny")
    wrong = random_peft_adapter(tiny, tmp_path / "wrong", "lora", r=4, targets=["q_proj"])
    out = tmp_path / "pkg"
    argv = ["build", "--profile", "cpu-2gb", "--method", "rtn", "--no-eval", "--out", str(out)]
    code = main([*argv, "--adapter", f"other={wrong}", "--adapter", f"other2={wrong}"])
    err = capsys.readouterr().err
    assert code == 1
    assert "adapter 'other'" in err
    assert "model.layers.0.self_attn.q_proj" in err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.fixture(scope="module")
def t4_package(
    tmp_path_factory: pytest.TempPathFactory, build_package, adapter_dirs: dict[str, Path]
) -> Path:
    return build_package(tmp_path_factory.mktemp("multi-t4"), _recipe(adapter_dirs), "t4-2gb")


def test_the_t4_package_takes_fp16_adapters_and_runs_each_one(
    t4_package: Path, cpu_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fp16 branches on the CUDA graph (run here through its CPU view); the CPU package's
    adapter file is another base build's and is refused by name."""
    from rslora_deploy.cli.app import main

    inputs = json.loads((t4_package / "adapters" / "graph_inputs.json").read_text())
    assert inputs["dtype"] == "float16"
    assert main(["verify", str(t4_package), "--no-generate"]) == 0
    texts = {}
    for name in ["base", "demo", "lora_qv", "vera_mlp"]:
        assert main(["run", str(t4_package), "--adapter", name, "--max-new-tokens", "8"]) == 0
        texts[name] = capsys.readouterr().out
    assert len(set(texts.values())) > 1, texts
    foreign = cpu_package / "adapters" / "lora_qv.onnx_adapter"
    argv = ["run", str(t4_package), "--adapter", "lora_qv", "--adapter-file", str(foreign)]
    assert main(argv) == 1
    assert "another base build" in capsys.readouterr().err
