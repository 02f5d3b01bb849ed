"""A plug-in of each kind, registered from this test module, carries a whole ``build``.

Nothing in the package is edited: an adapter format, a quantizer and an exporter are registered
here (one line each), a profile names the exporter, and ``build`` runs load -> merge -> quantize
-> export -> verify -> check_budget -> package on a tiny model through them. This is the check
behind docs/DESIGN.md's "adding a quantizer, exporter or adapter format is one module plus one
registration line".
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from rslora_deploy.adapters import ADAPTER_FORMATS
from rslora_deploy.adapters.base import AdapterContents, AdapterLoadOptions
from rslora_deploy.adapters.delta import ModuleDelta
from rslora_deploy.artifact import Artifact
from rslora_deploy.exporters import EXPORTERS
from rslora_deploy.exporters.base import Shape, kv_cache_bytes
from rslora_deploy.exporters.options import ExportConfig
from rslora_deploy.quantizers import QUANTIZERS
from tests import tolerances as tol

MODULE = "model.layers.0.mlp.down_proj"


class JsonDeltaFormat:
    """An adapter format made up for this test: one dense delta in ``delta.json``."""

    name: ClassVar[str] = "test-json-delta"

    def claims(self, directory: Path, names: frozenset[str]) -> bool:
        return "delta.json" in names

    def load(self, directory: Path, options: AdapterLoadOptions) -> AdapterContents:
        data = json.loads((directory / "delta.json").read_text())
        dense = np.asarray(data["delta"], dtype=np.float32)
        delta = ModuleDelta(data["module"], "linear", dense.shape[1], dense.shape[0], dense=dense)
        return AdapterContents([delta], {"source": "test"})

    def base_shapes_needed(self, directory: Path) -> list[str]:
        return []


class CopyQuantizer:
    """A 'quantizer' that keeps the weights as they are (a real method would round them)."""

    name: ClassVar[str] = "test-copy"
    needs_calibration: ClassVar[bool] = False
    supported_bits: ClassVar[tuple[int, ...]] = (4, 8)
    packs_output_features: ClassVar[bool] = False
    compute_dtypes: ClassVar[tuple[str, ...]] = ("bfloat16", "float16", "float32")
    unsupported_model_types: ClassVar[dict[str, str]] = {}

    def quantize(self, model_dir: Path, out_dir: Path, cfg: Any, calib: Any, extras: Any) -> dict:
        for item in model_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, out_dir / item.name)
        return {"format": "unquantized copy"}


class TorchFolderExporter:
    """An exporter that ships the Hugging Face folder and smoke-tests it with transformers."""

    name: ClassVar[str] = "test-torch-folder"
    runtime: ClassVar[str] = "transformers"
    fused_groups: ClassVar[tuple[tuple[str, ...], ...]] = ()
    config_class: ClassVar[type[ExportConfig]] = ExportConfig

    def check_config(self, cfg: ExportConfig, profile: Any) -> None:
        return None

    def export(self, quantized: Artifact, out_dir: Path, cfg: Any, profile: Any, log: Path):
        shutil.copytree(quantized.path, out_dir)
        return Artifact("hf-folder", out_dir, {"exporter": self.name})

    def smoke_test(self, model_dir: Path, profile: Any, work: Path) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        ids = tokenizer("the cat", return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=4, do_sample=False)
        return {
            "prompt": "the cat",
            "text": tokenizer.decode(out[0]),
            "new_tokens": int(out.shape[1] - ids.shape[1]),
            "prefill_seconds": 0.0,
            "decode_tokens_per_second": 0.0,
            "peak_rss_bytes": 0,
            "runtime": "transformers (in process)",
        }

    def cpu_runnable(self, model_dir: Path, profile: Any, work: Path) -> Path:
        return model_dir

    def io_bytes(self, profile: Any) -> int:
        return 4

    def usage(self) -> str:
        return "Load it with transformers' AutoModelForCausalLM."

    def package_shape(self, model_dir: Path, profile: Any) -> Shape:
        return Shape.of(profile)

    def budget_terms(
        self, view: Any, profile: Any, *, shape: Shape | None = None
    ) -> dict[str, int]:
        return {"kv_cache": kv_cache_bytes(view, profile, shape.max_length if shape else None)}

    def measurement_comparable(self, profile: Any) -> bool:
        return False

    def predict_weights(
        self, view: Any, profile: Any, bits: int, group_size: int
    ) -> tuple[dict[str, int], Shape]:
        # The folder holds the fp32 checkpoint as saved: projections and embedding at 4 bytes.
        from rslora_deploy.model_view import decoder_linear_params

        parts = {
            "projections": decoder_linear_params(view) * 4,
            "embedding": view.vocab * view.hidden * 4,
        }
        return parts, Shape.of(profile)


@pytest.fixture
def plugins() -> Iterator[None]:
    ADAPTER_FORMATS.register(JsonDeltaFormat.name)(JsonDeltaFormat)
    QUANTIZERS.register(CopyQuantizer.name)(CopyQuantizer)
    EXPORTERS.register(TorchFolderExporter.name)(TorchFolderExporter)
    try:
        yield
    finally:
        ADAPTER_FORMATS.unregister(JsonDeltaFormat.name)
        QUANTIZERS.unregister(CopyQuantizer.name)
        EXPORTERS.unregister(TorchFolderExporter.name)


def test_build_runs_through_plugins_registered_outside_the_package(plugins, tmp_path, tiny_dir):
    from safetensors.numpy import load_file

    from rslora_deploy.api import build
    from rslora_deploy.config import make_config

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    width = json.loads((tiny_dir / "config.json").read_text())
    delta = np.full((width["hidden_size"], width["intermediate_size"]), 0.01, dtype=np.float32)
    (adapter / "delta.json").write_text(json.dumps({"module": MODULE, "delta": delta.tolist()}))
    profile = tmp_path / "plugin.toml"
    profile.write_text(
        'description = "test"\ndevice = "cpu"\nruntime = "onnxruntime"\n'
        'execution_provider = "cpu"\nexporter = "test-torch-folder"\nexport_target = "cpu"\n'
        "memory_bytes = 2147483648\nreserved_bytes = 0\nsupported_bits = [4]\n"
        'max_seq_len = 64\nbatch_size = 1\nkv_dtype = "float32"\n'
    )
    config = make_config(
        {
            "profile": str(profile),
            "base": str(tiny_dir),
            "out": str(tmp_path / "pkg"),
            "adapter": {"path": str(adapter)},
            "quantize": {"method": "test-copy"},
            "eval": {"enabled": False},
        }
    )
    result = build(config)

    manifest = result.manifest
    assert manifest["inputs"]["adapter"]["format"] == "test-json-delta"
    assert manifest["quantization"]["method"] == "test-copy"
    assert manifest["export"] == {"exporter": "test-torch-folder"}
    assert manifest["smoke_test"]["runtime"] == "transformers (in process)"
    assert set(result.budget.terms_bytes) == {"weights", "kv_cache", "reserved"}
    # The delta really went through the merge into the shipped weights.
    key = f"{MODULE}.weight"
    shipped = load_file(str(tmp_path / "pkg" / "model" / "model.safetensors"))[key]
    base = load_file(str(tiny_dir / "model.safetensors"))[key]
    np.testing.assert_allclose(shipped - base, delta, atol=tol.FP32_ATOL)


def test_unknown_plugin_names_are_refused_with_the_registered_ones():
    from rslora_deploy.config import make_config
    from rslora_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="registered: awq, gptq, rtn"):
        make_config({"profile": "t4-2gb", "quantize": {"method": "test-copy"}})
