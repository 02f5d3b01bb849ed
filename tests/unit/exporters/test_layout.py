"""Export layout: lm_head precision per target, asymmetric int4 packing, the Gemma-3 config view.

Everything runs through the real onnxruntime-genai builder and onnxruntime on tiny models.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rslora_deploy.errors import ConfigError
from rslora_deploy.exporters.genai import layout
from rslora_deploy.exporters.genai.options import GenaiExportConfig


def _export(checkpoint: Path, root: Path, cfg: GenaiExportConfig):
    """Export for an onnxruntime-genai CPU target (fp32 activations)."""
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.exporters.genai.builder import export_onnx
    from rslora_deploy.testing.profiles import genai_cpu_profile

    root.mkdir(parents=True, exist_ok=True)
    return export_onnx(
        Artifact("hf-quantized", checkpoint), root / "onnx", cfg, genai_cpu_profile(),
        root / "export.log",
    )  # fmt: skip


def _nodes(folder: Path) -> dict[str, object]:
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return {node.name: node for node in graph.node}


def test_auto_resolves_per_target() -> None:
    cpu = layout.resolve(GenaiExportConfig(), "cpu")
    cuda = layout.resolve(GenaiExportConfig(), "cuda")
    assert (cpu.lm_head, cpu.accuracy_level) == ("int4", 4)
    assert (cuda.lm_head, cuda.accuracy_level) == ("fp16", 1)
    assert layout.resolve(GenaiExportConfig(lm_head_int4=True), "cuda").lm_head == "int4"
    fast = layout.resolve(GenaiExportConfig(lm_head="int4", accuracy_level=4), "cpu")
    # The parity gate follows what the layout changes on purpose (int8 activations, int4 head).
    assert layout.parity_tolerance(fast) > layout.parity_tolerance(cuda) == 0.02


@pytest.mark.parametrize(("target", "bad"), [("cpu", "fp16"), ("cuda", "fp32")])
def test_precision_the_target_cannot_run_is_refused(target: str, bad: str) -> None:
    with pytest.raises(ConfigError, match=rf"lm_head={bad} cannot run on profile 'p'.*auto"):
        layout.resolve(GenaiExportConfig(lm_head=bad), target, "p")


@pytest.fixture(scope="module")
def asym_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """The tiny Llama at RTN int4 g64 with zero points (``sym=False``)."""
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.config import QuantizeConfig
    from rslora_deploy.stages.quantize import quantize_model

    out = tmp_path_factory.mktemp("asym") / "q"
    quantize_model(Artifact("hf", tiny_dir), out, QuantizeConfig(method="rtn", sym=False))
    return out


@pytest.fixture(scope="module", params=["int4", "int8", "fp32"])
def lm_head_export(request: pytest.FixtureRequest, tmp_path_factory, asym_dir: Path):
    root = tmp_path_factory.mktemp(f"lm-{request.param}")
    art = _export(asym_dir, root, GenaiExportConfig(lm_head=request.param))
    return request.param, art


def _matmulnbits_weight(node, inits: dict[str, np.ndarray]) -> np.ndarray:
    """The [K, N] weight onnxruntime's MatMulNBits kernel computes with: run it on the identity."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k = attrs["K"]
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [k, k])]
    single = helper.make_node(
        "MatMulNBits", ["x", *node.input[1:]], ["y"], domain="com.microsoft", **attrs
    )
    graph = helper.make_graph(
        [single], "one", inputs, [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(inits[name], name) for name in node.input[1:] if name],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": np.eye(k, dtype=np.float32)})[0]


def test_asymmetric_codes_round_trip_bit_exact(tmp_path: Path, asym_dir: Path) -> None:
    """Every 4-bit code, zero point and scale of the asymmetric checkpoint reaches onnxruntime's
    kernel unchanged: the weight it computes with equals our dequantization bit for bit."""
    import onnx
    from onnx import numpy_helper

    from rslora_deploy.exporters.genai import mixed_bits
    from rslora_deploy.quantizers import rtn_math
    from rslora_deploy.quantizers.checkpoint import load_tensors

    art = _export(asym_dir, tmp_path, GenaiExportConfig(lm_head="fp32", accuracy_level=1))
    model = onnx.load(str(art.path / "model.onnx"), load_external_data=True)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    tensors = load_tensors(asym_dir)
    checked = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        prefix = node.input[1].rsplit(".MatMulNBits.", 1)[0]
        parts = []
        modules = mixed_bits.node_modules(prefix)
        for module in modules:
            packed = rtn_math.PackedGPTQ(
                *(tensors[f"{module}.{t}"] for t in ("qweight", "qzeros", "scales", "g_idx"))
            )
            gq = rtn_math.unpack_gptq(packed, 4)
            assert len(np.unique(gq.zeros)) > 1  # really asymmetric
            parts.append(rtn_math.dequantize(gq))
        expected = np.concatenate(parts).T
        np.testing.assert_array_equal(_matmulnbits_weight(node, inits), expected)
        checked += modules
    assert len(set(checked)) == 14  # 2 layers x 7 projections, each checked once


def test_lm_head_variants_export_and_load(lm_head_export) -> None:
    from rslora_deploy.exporters.genai.smoke import smoke_generate

    precision, art = lm_head_export
    nodes = _nodes(art.path)
    head_nodes = [n for name, n in nodes.items() if name.startswith(("/lm_head", "/model/embed"))]
    ops = {node.op_type for node in head_nodes}
    expected = {
        "int4": {"MatMulNBits", "GatherBlockQuantized"},
        "int8": {"MatMulNBits", "Gather"},
        "fp32": {"MatMul", "Gather"},
    }[precision]
    assert expected <= ops, ops
    if precision != "fp32":
        head = next(n for n in head_nodes if n.op_type == "MatMulNBits")
        bits = next(a.i for a in head.attribute if a.name == "bits")
        assert bits == int(precision[3:])
    assert art.meta["lm_head"] == precision
    assert smoke_generate(art.path, max_new_tokens=4, max_length=64)["new_tokens"] > 0


def test_builder_config_view_flattens_the_rope_bases() -> None:
    from rslora_deploy.exporters.genai.run_builder import builder_config_view
    from rslora_deploy.testing.tiny import tiny_gemma3

    config = builder_config_view(tiny_gemma3().config)
    assert (config.rope_theta, config.rope_local_base_freq) == (1e6, 1e4)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}


def test_gemma3_exports_and_matches_the_dequantized_model(tmp_path: Path) -> None:
    """The builder 0.18 fails on a transformers-5 Gemma-3 config without the view; with it, the
    sliding (base 1e4) and full (base 1e6) layers' RoPE tables must both be right for the ONNX
    logits to match the exactly dequantized checkpoint over 40 positions (window 4)."""
    import torch

    from rslora_deploy.artifact import Artifact
    from rslora_deploy.config import QuantizeConfig
    from rslora_deploy.evaluation.quality import dequantized_gptq_model, onnx_logits
    from rslora_deploy.stages.quantize import quantize_model
    from rslora_deploy.testing.tiny import save_tiny, tiny_gemma3
    from rslora_deploy.testing.tokenizer import TINY_VOCAB, save_tiny_tokenizer

    base = save_tiny(tiny_gemma3(hidden=128, vocab=TINY_VOCAB), tmp_path / "base")
    save_tiny_tokenizer(base)
    quantized = quantize_model(
        Artifact("hf", base), tmp_path / "q", QuantizeConfig(method="rtn", sym=False)
    )
    art = _export(quantized.path, tmp_path, GenaiExportConfig(lm_head="fp32", accuracy_level=1))
    ids = np.random.default_rng(0).integers(3, TINY_VOCAB, 40)
    with torch.no_grad():
        ref = dequantized_gptq_model(quantized.path)(torch.from_numpy(ids[None])).logits[0]
    got = onnx_logits(art.path)(ids)
    assert np.linalg.norm(got - ref.numpy()) / np.linalg.norm(ref.numpy()) < 2e-3
    # The builder's own default keeps a ring-buffer cache for the sliding layers, which only the
    # runtime can feed: onnx_logits scores it through onnxruntime-genai, and gets the same logits.
    windowed = tmp_path / "windowed"
    command = [sys.executable, "-m", "rslora_deploy.exporters.genai.run_builder",
               "-i", str(quantized.path), "-o", str(windowed), "-p", "int4", "-e", "cpu",
               "-c", str(tmp_path / "cache"), "--extra_options", "accuracy_level=1",
               "nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather",
               "shared_embeddings=true"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    config = json.loads((windowed / "genai_config.json").read_text())
    assert config["model"]["decoder"]["sliding_window"]["window_size"] == 4
    got = onnx_logits(windowed)(ids)
    assert np.linalg.norm(got - ref.numpy()) / np.linalg.norm(ref.numpy()) < 2e-3
