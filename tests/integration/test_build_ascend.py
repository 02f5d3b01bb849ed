"""``rslora-deploy build --profile ascend-310p-2gb`` / ``ascend-310b-2gb`` on the real SmolLM2.

One build per profile (module fixtures), RTN so the quantizer takes seconds, no evaluation; the
quantized checkpoint is kept in the package so the test can rebuild the exact PyTorch module the
graph was exported from. The assertions are the issue's: zero unsupported nodes, static for every
gear, the same greedy tokens as PyTorch on 5 prompts x 32 tokens, an fp16 manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rslora_deploy.exporters.ascend.exporter import run_shipped_runner
from rslora_deploy.exporters.ascend.op_lint import lint_package

pytestmark = pytest.mark.slow

RECIPE = """
[quantize]
method = "rtn"
group_size = 64
[eval]
enabled = false
[package]
keep_quantized_checkpoint = true
"""
PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
)
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=["ascend-310p-2gb", "ascend-310b-2gb"])
def package(request, tmp_path_factory, smollm2_dir: Path, build_package: Any) -> Path:
    return build_package(tmp_path_factory.mktemp(request.param), RECIPE, request.param)


def test_lint_zero_unsupported_and_static(package: Path) -> None:
    report = json.loads((package / "reports" / "op_lint.json").read_text())
    assert report["passed"]
    assert report["unsupported_nodes"] == 0
    assert all(g["static"] for g in report["gears"].values())
    assert lint_package(package).to_dict()["passed"]


def test_manifest_says_fp16_not_int4(package: Path) -> None:
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["export"]["exporter"] == "ascend-om"
    assert manifest["export"]["precision"].startswith("fp16")
    assert "int4" not in json.dumps(manifest["export"]).replace("no int4", "")


def test_same_greedy_tokens_as_pytorch(package: Path) -> None:
    from transformers import AutoTokenizer

    from rslora_deploy.exporters.ascend.model import greedy_reference
    from rslora_deploy.exporters.ascend.weights import build_decoder

    model_dir = package / "model"
    if json.loads((package / "manifest.json").read_text())["profile"]["name"] != "ascend-310p-2gb":
        # The 310B decoder is the same export code with a shorter KV buffer (1024 vs 2048; the
        # tiny-model tests cover other lengths), and the fp16 PyTorch reference recomputes the
        # whole sequence every step (minutes per prompt on a 2-core CI box): run it once.
        pytest.skip("greedy check runs on ascend-310p-2gb only (same exporter, KV 2048 vs 1024)")
    # The reference's buffer only needs to cover the positions (masked slots add nothing).
    decoder, _ = build_decoder(package / "quantized", 128)
    tok = AutoTokenizer.from_pretrained(model_dir)
    for text in PROMPTS:
        prompt = tok(text)["input_ids"]
        got = run_shipped_runner(model_dir, ids=prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        want, _ = greedy_reference(decoder, prompt, NEW_TOKENS)
        assert got["new_ids"] == want, (text, tok.decode(got["new_ids"]), tok.decode(want))
