"""ascend-om on the families added after Llama/Qwen2: Qwen3 (q/k norms), Mistral, Phi-3 (fused
qkv_proj/gate_up_proj split at load) and GLM-4 (fused gate_up_proj, q/k/v biases, partial
interleaved RoPE reordered into rotate_half's layout, post-branch norms).

Each is exported, linted, and run by the shipped runner on ONNX Runtime CPU against transformers'
fp32 model (prompt logits) and against the exported module in PyTorch (greedy tokens). Smaller
than tests/unit/exporters/test_ascend.py's grid (two gears, two prompts) to keep the suite fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rslora_deploy.artifact import Artifact
from rslora_deploy.errors import UnsupportedError
from rslora_deploy.exporters.ascend.exporter import AscendExporter, run_shipped_runner
from rslora_deploy.exporters.ascend.model import greedy_reference
from rslora_deploy.exporters.ascend.options import AscendExportConfig
from rslora_deploy.exporters.ascend.weights import build_decoder, glm_head_order
from rslora_deploy.profiles import load_profile
from rslora_deploy.testing import tiny
from tests import tolerances as tol

KV = 64
GEARS = (1, 16)
NEW_TOKENS = 16
PROMPT_LENGTHS = (5, 21)  # 21: two prefill chunks

ARCHS: dict[str, Callable[[], Any]] = {
    "qwen3": lambda: tiny.tiny_qwen3(tie=True),
    "mistral": lambda: tiny.tiny_mistral(kv_heads=1, seed=3),
    "phi3": lambda: tiny.tiny_phi3(seed=4),
    "glm4": lambda: tiny.tiny_glm(seed=5),
}


def _prompts(vocab: int) -> list[list[int]]:
    gen = np.random.default_rng(1)
    return [gen.integers(3, vocab, size=n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module", params=sorted(ARCHS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    model = ARCHS[request.param]()
    root = tmp_path_factory.mktemp(f"ascend-{request.param}")
    src = tiny.save_tiny(model, root / "hf")
    (root / "reports").mkdir()
    cfg = AscendExportConfig(max_length=KV, gears=GEARS)
    profile = load_profile("ascend-310p-2gb")
    art = AscendExporter().export(Artifact("hf", src), root / "model", cfg, profile, root / "x.log")
    return request.param, model, src, art


def test_lint_clean_and_static_per_gear(exported) -> None:
    _, _, _, art = exported
    report = json.loads((art.path.parent / "reports" / "op_lint.json").read_text())
    assert report["passed"], report["errors"]
    assert report["unsupported_nodes"] == 0
    assert report["gears"] == {str(g): {"static": True, "dynamic_values": 0} for g in GEARS}


def test_prompt_logits_within_fp16_tolerance(exported) -> None:
    import importlib.util

    _, model, _, art = exported
    spec = importlib.util.spec_from_file_location("runner", art.path / "runner/ascend_runner.py")
    runner_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner_mod)
    io_spec = json.loads((art.path / "io_spec.json").read_text())
    runner = runner_mod.KVRunner(io_spec, runner_mod.OrtBackend(art.path, io_spec))
    for prompt in _prompts(io_spec["outputs"][0]["shape"][-1]):
        got = runner.score(prompt)
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0].numpy()
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert rel < tol.ASCEND_FP16_LOGITS, rel
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_runner_greedy_tokens_match_pytorch(exported) -> None:
    """As test_ascend.py: a difference only at a step where PyTorch's fp16 logits tie."""
    name, _, src, art = exported
    decoder, _ = build_decoder(src, KV)
    for prompt in _prompts(decoder.dims.vocab):
        got = run_shipped_runner(art.path, ids=prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        want, ties = greedy_reference(decoder, prompt, NEW_TOKENS, tol.ASCEND_TIE_RELATIVE)
        assert len(got["new_ids"]) == len(want) == NEW_TOKENS
        pairs = zip(got["new_ids"], want, strict=True)
        diff = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        assert diff is None or ties[diff], (name, prompt, diff, got["new_ids"], want)


def test_glm_v1_decoder_matches_transformers(tmp_path: Path) -> None:
    """GlmForCausalLM (no post-branch norms) in PyTorch only: the module the graph is made of."""
    model = tiny.tiny_glm(version=1, seed=6)
    src = tiny.save_tiny(model, tmp_path / "hf")
    decoder, facts = build_decoder(src, 32)
    assert facts["architecture"] == "GlmForCausalLM"
    ids = tiny.example_inputs(batch=1, seq=20)[0].tolist()
    dims = decoder.dims
    kv = torch.zeros(1, dims.kv_heads, dims.kv_len, dims.head_dim, dtype=torch.float16)
    mask = torch.zeros(1, dims.kv_len + len(ids), dtype=torch.long)
    mask[0, dims.kv_len :] = 1
    with torch.no_grad():
        got = decoder(torch.tensor([ids]), mask, torch.arange(len(ids))[None], *[kv] * 4)[0]
        ref = model(torch.tensor([ids])).logits[0, -1]
    rel = (got[0, 0].float() - ref).norm() / ref.norm()
    assert rel < tol.ASCEND_FP16_LOGITS, rel


def test_glm_head_order_pairs_interleaved_dims_at_half_distance() -> None:
    order = glm_head_order(head_dim=8, rotary_dim=4)
    assert order == [0, 2, 4, 5, 1, 3, 6, 7]  # pairs (0,1), (2,3) -> dims (0,4), (1,5)
    assert sorted(order) == list(range(8))


def test_sliding_window_shorter_than_the_buffer_is_refused(tmp_path: Path) -> None:
    model = tiny.tiny_mistral()
    model.config.sliding_window = 16
    src = tiny.save_tiny(model, tmp_path / "hf")
    with pytest.raises(UnsupportedError, match=r"sliding-window attention \(window 16, buffer 32"):
        build_decoder(src, 32)
    assert build_decoder(src, 16)[0].dims.kv_len == 16  # a window covering the buffer is exact
