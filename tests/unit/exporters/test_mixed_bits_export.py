"""Mixed 4/8-bit export (``--protect-adapter``): 8-bit MatMulNBits written into the builder's graph.

The tiny model goes through the real onnxruntime-genai builder and the real onnxruntime; the ONNX
logits are compared with an exact dequantization of the same checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rslora_deploy.errors import UnsupportedError
from rslora_deploy.exporters.genai import mixed_bits
from rslora_deploy.quantizers import rtn_math
from tests import tolerances as tol

PROTECTED = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """The tiny model at RTN int4 g64 with two modules kept at 8 bits, as --protect-adapter does."""
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.config import QuantizeConfig
    from rslora_deploy.quantizers.base import QuantizeExtras
    from rslora_deploy.stages.quantize import quantize_model

    dynamic = {f"+:^{m.replace('.', chr(92) + '.')}$": {"bits": 8} for m in PROTECTED}
    out = tmp_path_factory.mktemp("mixed") / "q"
    cfg = QuantizeConfig(method="rtn", group_size=64)
    quantize_model(Artifact("hf", tiny_dir), out, cfg, extras=QuantizeExtras(dynamic=dynamic))
    return out


@pytest.fixture(scope="module", params=["float", "nbits8"])
def mixed_onnx(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, mixed_dir: Path
) -> tuple[str, Path]:
    """The mixed checkpoint exported for a genai CPU target (accuracy level 1) in
    both layouts: ``float`` is what ``auto`` picks there, ``nbits8`` what it picks for CUDA."""
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.exporters.genai.builder import export_onnx
    from rslora_deploy.exporters.genai.options import GenaiExportConfig
    from rslora_deploy.testing.profiles import genai_cpu_profile

    root = tmp_path_factory.mktemp(f"mixed-onnx-{request.param}")
    art = export_onnx(
        Artifact("hf-quantized", mixed_dir),
        root / "onnx",
        GenaiExportConfig(protected_layout=request.param, accuracy_level=1, lm_head="fp32"),
        genai_cpu_profile(),
        root / "export.log",
    )
    assert art.meta["protected_8bit"]["layout"] == request.param
    return request.param, art.path


def test_auto_layout_follows_target_and_accuracy_level() -> None:
    from rslora_deploy.exporters.genai import layout
    from rslora_deploy.exporters.genai.builder import protected_layout
    from rslora_deploy.exporters.genai.options import GenaiExportConfig

    def resolved(cfg: GenaiExportConfig, target: str) -> str:
        return protected_layout(cfg, layout.resolve(cfg, target))

    assert resolved(GenaiExportConfig(accuracy_level=1), "cpu") == "float"
    assert resolved(GenaiExportConfig(), "cpu") == "nbits8"  # the CPU default is level 4
    assert resolved(GenaiExportConfig(accuracy_level=4), "cpu") == "nbits8"
    assert resolved(GenaiExportConfig(), "cuda") == "nbits8"
    assert (
        resolved(GenaiExportConfig(protected_layout="nbits8", accuracy_level=1), "cpu") == "nbits8"
    )


def test_mixed_bits_reads_the_overrides(mixed_dir: Path, rtn_dir: Path) -> None:
    mixed = mixed_bits.mixed_bits(mixed_dir)
    assert mixed is not None
    assert mixed.overrides == dict.fromkeys(PROTECTED, 8)
    assert mixed_bits.mixed_bits(rtn_dir) is None


def test_protected_nodes_change_and_the_rest_stay_4bit(mixed_onnx: tuple[str, Path]) -> None:
    import onnx

    layout, folder = mixed_onnx
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    kinds = {}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            kinds[node.name] = f"nbits{next(a.i for a in node.attribute if a.name == 'bits')}"
        elif node.op_type == "MatMul" and "/layers." in node.name:
            kinds[node.name] = "float"
    changed = {name for name, kind in kinds.items() if kind != "nbits4"}
    op = "MatMulNBits" if layout == "nbits8" else "MatMul"
    assert changed == {
        f"/model/layers.0/attn/qkv_proj/{op}",
        f"/model/layers.1/mlp/down_proj/{op}",
    }
    assert {kinds[name] for name in changed} == {layout}
    assert len(kinds) > len(changed)
    assert not list(folder.glob(".*"))


def test_onnx_logits_equal_exact_dequantization(
    mixed_onnx: tuple[str, Path], mixed_dir: Path
) -> None:
    """fp32 activations (cpu target, accuracy_level 1) against the exact dequantized weights: the
    8-bit codes, the promoted 4-bit k/v codes of the fused node and the untouched 4-bit nodes all
    have to be right for the error to be at float rounding level."""
    from rslora_deploy.evaluation.quality import relative_logit_error

    _, folder = mixed_onnx
    assert (
        relative_logit_error(folder, mixed_dir, windows=2, window_len=64)
        < tol.ONNX_VS_EXACT_DEQUANT
    )


def test_promoted_4bit_codes_keep_their_values() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((48, 128)).astype(np.float32)
    for sym in (True, False):
        gq = rtn_math.quantize_rtn(weight, 4, 64, sym=sym)
        q8, z8 = mixed_bits.codes_8bit(gq)
        as_8bit = rtn_math.GroupQuant(q8, gq.scales, z8.astype(np.int64), 8, 64)
        np.testing.assert_array_equal(rtn_math.dequantize(as_8bit), rtn_math.dequantize(gq))


def test_node_names_map_to_modules() -> None:
    assert mixed_bits.node_modules("model.layers.3.attn.qkv_proj") == (
        "model.layers.3.self_attn.q_proj",
        "model.layers.3.self_attn.k_proj",
        "model.layers.3.self_attn.v_proj",
    )
    assert mixed_bits.node_modules("model.layers.3.attn.o_proj") == (
        "model.layers.3.self_attn.o_proj",
    )
    assert mixed_bits.node_modules("model.layers.0.mlp.down_proj") == (
        "model.layers.0.mlp.down_proj",
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [({"desc_act": True}, "act-order"), ({"quant_method": "awq"}, "GPTQ checkpoint")],
)
def test_unsupported_mixed_checkpoints_are_refused(
    tmp_path: Path, mixed_dir: Path, change: dict[str, object], message: str
) -> None:
    copy = tmp_path / "q"
    copy.mkdir()
    for item in mixed_dir.iterdir():
        (copy / item.name).symlink_to(item)
    config = json.loads((mixed_dir / "config.json").read_text())
    config["quantization_config"].update(change)
    (copy / "config.json").unlink()
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match=message):
        mixed_bits.mixed_bits(copy)


def test_mixed_checkpoint_passes_the_consistency_check(mixed_dir: Path) -> None:
    """Handed to a build as an already-quantized model, the 8-bit layers check at 8 bits."""
    from rslora_deploy.quantizers.checkpoint import check_prequantized

    assert check_prequantized(mixed_dir)["layers"] == 14
