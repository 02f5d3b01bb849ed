"""``rslora-deploy budget``: profile tables, solver exit 3, bad sizes, absent devices, HTML."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from rslora_deploy.cli.app import main

# Qwen2.5-0.5B's config.json fields (vocab 151,936; context 32,768): prediction needs no weights.
QWEN_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}  # fmt: skip


@pytest.fixture
def qwen_config(tmp_path: Path) -> Path:
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN_CONFIG))
    return folder


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_over_budget_exits_3_and_names_the_largest_max_length(
    qwen_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rslora_deploy.memory.solver import Layout, total
    from rslora_deploy.model_view import model_view
    from rslora_deploy.profiles import load_profile
    from rslora_deploy.stages.budget import Shape, predict_weight_bytes

    argv = ["budget", str(qwen_config), "--profile", "t4-2gb", "--max-length", "32768"]
    code, out, _ = _run([*argv, "--format", "json"], capsys)
    assert code == 3
    answer = json.loads(out)["solver"]
    largest = answer["largest_max_length"]
    profile, view = load_profile("t4-2gb"), model_view(qwen_config)
    layout = Layout(sum(predict_weight_bytes(view, 4, 64, profile).values()))
    assert total(layout, view, profile, Shape(largest, 1)) <= profile.memory_bytes
    assert total(layout, view, profile, Shape(largest + 1, 1)) > profile.memory_bytes
    code, out, _ = _run(argv, capsys)
    assert code == 3
    assert f"the largest max_length that fits is {largest}" in out


def test_profile_all_is_one_table(qwen_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rslora_deploy.profiles import list_profiles

    code, out, _ = _run(["budget", "--model", str(qwen_config), "--profile", "all"], capsys)
    names = [p.name for p in list_profiles()]
    assert code in (0, 3)
    for name in names:
        assert name in out
    code, out, _ = _run(
        ["budget", str(qwen_config), "--profile", "all", "--format", "json"], capsys
    )
    rows = json.loads(out)["profiles"]
    assert [r["estimate"]["profile"] for r in rows] == names


def test_profile_all_answers_fast_for_a_1_5b_config(tmp_path: Path) -> None:
    """Prediction only (no weights, no torch): a fresh process answers in well under a second
    of CPU time for a Qwen2.5-1.5B-shaped config.json."""
    import sys

    folder = tmp_path / "q15"
    folder.mkdir()
    config = {**QWEN_CONFIG, "hidden_size": 1536, "intermediate_size": 8960,
              "num_hidden_layers": 28, "num_attention_heads": 12}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    code = (
        "import resource, sys, time; t = time.perf_counter()\n"
        "from rslora_deploy.cli.app import main\n"
        f"argv = ['budget', '--model', {str(folder)!r}, '--profile', 'all', '--format', 'json']\n"
        "rc = main(argv)\n"
        "ru = resource.getrusage(resource.RUSAGE_SELF)\n"
        "print(rc, ru.ru_utime + ru.ru_stime, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rc, cpu_seconds, torch_loaded = proc.stdout.strip().splitlines()[-1].split()
    assert rc in ("0", "3")
    assert torch_loaded == "False"
    assert float(cpu_seconds) < 1.0


@pytest.mark.parametrize(
    ("flags", "field"),
    [(["--max-length", "0"], "max_length"), (["--max-length", "-4"], "max_length"),
     (["--batch", "0"], "batch"), (["--max-length", "40000"], "above the model's context")],
)  # fmt: skip
def test_bad_sizes_exit_1_naming_the_field(
    qwen_config: Path, capsys: pytest.CaptureFixture[str], flags: list[str], field: str
) -> None:
    code, _, err = _run(["budget", str(qwen_config), "--profile", "cpu-2gb", *flags], capsys)
    assert code == 1
    assert field in err
    assert len(err.strip().splitlines()) == 1


def test_measure_on_an_absent_device_writes_nothing(
    tiny_onnx_cpu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "pkg"
    shutil.copytree(tiny_onnx_cpu, folder)
    before = sorted(p.name for p in folder.rglob("*"))
    code, _, err = _run(["budget", str(folder), "--profile", "t4-2gb", "--measure"], capsys)
    assert code == 1
    assert "NVIDIA GPU" in err
    assert "'cuda'" in err
    assert sorted(p.name for p in folder.rglob("*")) == before


def test_profile_typo_in_a_closed_field_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], qwen_config: Path
) -> None:
    from rslora_deploy.profiles import profiles_dir

    text = (profiles_dir() / "t4-2gb.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("reserved_bytes = 708837376", "reserved_bytes = -1"))
    code, _, err = _run(["budget", str(qwen_config), "--profile", str(bad)], capsys)
    assert code == 1
    assert "reserved_bytes" in err
    bad.write_text(text.replace('kind = "allowance"', 'kind = "gessed"'))
    code, _, err = _run(["budget", str(qwen_config), "--profile", str(bad)], capsys)
    assert code == 1
    assert "reserved_source.kind" in err


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason="needs Debian's chromium at /usr/bin/chromium (make test tries apt-get install -y "
    "chromium; it could not be installed here)",
)
def test_html_report_renders_in_headless_chromium(
    qwen_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np
    from PIL import Image

    page = tmp_path / "budget.html"
    code, _, _ = _run(
        [
            "budget",
            str(qwen_config),
            "--profile",
            "all",
            "--max-length",
            "4096",
            "--html",
            str(page),
        ],
        capsys,
    )
    assert code in (0, 3)
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert "<script" not in text
    assert "https://" not in text
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--enable-logging=stderr", "--v=0", "--window-size=1000,700",
         f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert shot.is_file(), proc.stderr[-2000:]
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln or ":CONSOLE(" in ln]
    assert console == [], console
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)
    assert pixels.std() > 10  # not blank
    # The estimate's bar colours are on the page (weights blue, reserved grey).
    colours = {tuple(p) for p in pixels.reshape(-1, 3)[::7]}
    assert (0x4E, 0x79, 0xA7) in colours


def test_model_prediction_follows_each_exporters_default_layout(
    qwen_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """cpu-2gb: the int4 head shared with the embedding at level 4, charged its packed copy;
    t4-2gb: the fp16 head; ascend: fp16 weights of everything (bits do not apply)."""
    from rslora_deploy.memory.estimate import decoder_linear_params, predict_weight_bytes
    from rslora_deploy.model_view import model_view
    from rslora_deploy.profiles import load_profile

    code, out, _ = _run(
        ["budget", str(qwen_config), "--profile", "all", "--format", "json"], capsys
    )
    rows = {r["estimate"]["profile"]: r["estimate"] for r in json.loads(out)["profiles"]}
    view = model_view(qwen_config)

    cpu = load_profile("cpu-2gb")
    parts = predict_weight_bytes(view, 4, 64, cpu, lm_head_int4=True)
    terms = rows["cpu-2gb"]["terms_bytes"]
    assert terms["weights"] == sum(parts.values())
    assert terms["lm_head_prepack"] == 0
    level4 = parts["projections"] + parts["lm_head"]
    assert terms["nbits_prepack"] == round(cpu.nbits_prepack_factor * level4)
    assert "int4 lm_head" in rows["cpu-2gb"]["weights_source"]

    t4 = load_profile("t4-2gb")
    assert rows["t4-2gb"]["terms_bytes"]["weights"] == sum(
        predict_weight_bytes(view, 4, 64, t4).values()
    )

    ascend = rows["ascend-310p-2gb"]["terms_bytes"]["weights"]
    assert ascend > 2 * (decoder_linear_params(view) + view.vocab * view.hidden) * 0.99
