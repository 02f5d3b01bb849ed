"""The estimate's graph-read inputs: the level-4 ``MatMulNBits`` bytes and their prepack term."""

from __future__ import annotations

from pathlib import Path

import pytest

from rslora_deploy.memory.estimate import estimate, level4_nbits_bytes, package_shape
from rslora_deploy.model_view import view_from_genai
from rslora_deploy.profiles import load_profile


def _export(root: Path, rtn_dir: Path, **layout: object) -> Path:
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.exporters.genai.builder import export_onnx
    from rslora_deploy.exporters.genai.options import GenaiExportConfig

    cfg = GenaiExportConfig(max_length=128, **layout)
    art = export_onnx(
        Artifact("hf-quantized", rtn_dir), root / "model", cfg, load_profile("cpu-2gb"),
        root / "export.log",
    )  # fmt: skip
    return art.path


@pytest.fixture(scope="module")
def tiny_onnx_level4(tmp_path_factory: pytest.TempPathFactory, rtn_dir: Path) -> Path:
    """The RTN tiny model exported for cpu-2gb with the int4 head at accuracy level 4."""
    root = tmp_path_factory.mktemp("tiny-onnx-level4")
    return _export(root, rtn_dir, lm_head="int4", accuracy_level=4)


@pytest.fixture(scope="module")
def tiny_onnx_level1(tmp_path_factory: pytest.TempPathFactory, rtn_dir: Path) -> Path:
    """The same with the fp32 head at accuracy level 1 (no int8-activation kernel)."""
    root = tmp_path_factory.mktemp("tiny-onnx-level1")
    return _export(root, rtn_dir, lm_head="fp32", accuracy_level=1)


def _matmulnbits_initializer_bytes(onnx_dir: Path) -> int:
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(onnx_dir / "model.onnx"))  # with the data: real tensor sizes
    names = {
        n for node in model.graph.node if node.op_type == "MatMulNBits" for n in node.input[1:]
    }
    assert not any(uses_external_data(i) for i in model.graph.initializer)
    return sum(len(i.raw_data) for i in model.graph.initializer if i.name in names)


def test_level4_bytes_are_the_matmulnbits_weights(tiny_onnx_level4: Path) -> None:
    expected = _matmulnbits_initializer_bytes(tiny_onnx_level4)
    assert expected > 0
    assert level4_nbits_bytes(tiny_onnx_level4) == expected


def test_level1_graph_has_no_level4_bytes(tiny_onnx_level1: Path, tmp_path: Path) -> None:
    assert level4_nbits_bytes(tiny_onnx_level1) == 0
    assert level4_nbits_bytes(tmp_path) == 0  # no graph: nothing charged, like level 1


def test_prepack_term_is_the_profiles_factor(
    tiny_onnx_level4: Path, tiny_onnx_level1: Path
) -> None:
    profile = load_profile("cpu-2gb")
    assert profile.nbits_prepack_factor > 0
    level4 = estimate(tiny_onnx_level4, view_from_genai(tiny_onnx_level4), profile)
    shape = package_shape(tiny_onnx_level4, profile)
    assert not shape.float_lm_head
    assert level4["terms_bytes"]["nbits_prepack"] == round(
        profile.nbits_prepack_factor * shape.level4_nbits_bytes
    )
    level1 = estimate(tiny_onnx_level1, view_from_genai(tiny_onnx_level1), profile)
    assert level1["terms_bytes"]["nbits_prepack"] == 0
    # A CUDA profile never charges it (its kernel ignores accuracy_level).
    cuda = estimate(tiny_onnx_level4, view_from_genai(tiny_onnx_level4), load_profile("t4-2gb"))
    assert cuda["terms_bytes"]["nbits_prepack"] == 0
