"""The ``onnxruntime-genai`` exporter: int4 ``MatMulNBits`` + ``GroupQueryAttention`` + KV cache.

It wraps the onnxruntime-genai model builder (:mod:`.builder`), its smoke test (:mod:`.smoke`)
and the memory its graph allocates at run time. The budget terms (docs/budget.md), at the
package's shape (max_length L, batch B):

    lm_head_prepack = V * H * io           cpu target with a float lm_head: onnxruntime's MLAS
                                           keeps a prepacked copy of a constant MatMul weight
    nbits_prepack = nbits_prepack_factor * (bytes of MatMulNBits weights at accuracy_level 4)
                                           cpu target: the int8-activation kernel's packed copy
                                           (measured per runtime, docs/budget.md)
    kv_cache    = B * layers * 2 * kv_heads * head_dim * L * io
                  (the builder writes past/present in the graph's io dtype; onnxruntime-genai
                   preallocates them to max_length: stack-notes measured 69 MB growth from 512
                   to 2048 tokens on SmolLM2 against 70.8 MB by this formula)
    logits      = B * V * io          (last-token graph, builder prune_lm_head: the default)
                  B * L * V * io      (a graph returning every position)
    activations = activation_factor * B * L * (4 * H + 3 * intermediate) * io
                  + B * heads * L**2 * 4   (one layer's fp32 attention scores, unless the
                                            profile's runtime was measured not to keep them)

io is 2 for an fp16-activation (cuda) graph and 4 for a cpu one; activation_factor and
attention_scores are the profile's measured runtime coefficients.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rslora_deploy.exporters.base import RuntimeAdapter, Shape
from rslora_deploy.exporters.genai.fused import FUSED_GROUPS
from rslora_deploy.exporters.genai.options import GenaiExportConfig
from rslora_deploy.profiles import ExportTarget

if TYPE_CHECKING:
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.exporters.options import ExportConfig
    from rslora_deploy.model_view import ModelView
    from rslora_deploy.profiles import DeviceProfile


GENAI_USAGE = """Load it with onnxruntime-genai:

```python
import onnxruntime_genai as og
model = og.Model('model')
tokenizer = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(do_sample=False, max_length=64)
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode('The capital of France is'))
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)))
```
"""


class GenaiExporter:
    """Export through the onnxruntime-genai model builder, for its CPU or CUDA runtime."""

    name: ClassVar[str] = "onnxruntime-genai"
    runtime: ClassVar[str] = "onnxruntime-genai"
    #: The builder fuses q/k/v into one MatMul and gate/up into another: members of a group must
    #: share a precision (protection planning widens a protected module to its group; fused.py).
    fused_groups: ClassVar[tuple[tuple[str, ...], ...]] = FUSED_GROUPS
    config_class: ClassVar[type[GenaiExportConfig]] = GenaiExportConfig

    def check_config(self, cfg: ExportConfig, profile: DeviceProfile) -> None:
        """Resolve the layout for the profile's target: a precision it cannot run is refused."""
        from rslora_deploy.exporters.genai.layout import resolve

        resolve(GenaiExportConfig.of(cfg, self.name), profile.export_target, profile.name)

    def export(
        self,
        quantized: Artifact,
        out_dir: Path,
        cfg: ExportConfig,
        profile: DeviceProfile,
        log_path: Path,
    ) -> Artifact:
        """Run the builder in a child process (:func:`.builder.export_onnx`)."""
        from rslora_deploy.exporters.genai.builder import export_onnx

        options = GenaiExportConfig.of(cfg, self.name)
        return export_onnx(quantized, out_dir, options, profile, log_path)

    def cpu_runnable(self, model_dir: Path, profile: DeviceProfile, work: Path) -> Path:
        """The model itself for a CPU target; a CPU-provider view of a CUDA-target graph."""
        if profile.export_target == ExportTarget.CPU:
            return model_dir
        from rslora_deploy.exporters.genai.builder import cpu_view

        return cpu_view(model_dir, work / "cpu_view")

    def smoke_test(self, model_dir: Path, profile: DeviceProfile, work: Path) -> dict[str, Any]:
        """Greedy generation with onnxruntime-genai in a child process (:mod:`.smoke`)."""
        from rslora_deploy.exporters.genai.smoke import smoke_generate

        return smoke_generate(self.cpu_runnable(model_dir, profile, work))

    def io_bytes(self, profile: DeviceProfile) -> int:
        """fp16 activations on CUDA, fp32 on CPU."""
        return 2 if profile.export_target == ExportTarget.CUDA else 4

    def usage(self) -> str:
        """The onnxruntime-genai greedy loop over ``model/``."""
        return GENAI_USAGE

    def package_shape(self, model_dir: Path, profile: DeviceProfile) -> Shape:
        """genai_config.json's max_length; the graph's logits, head precision and level-4 bytes."""
        import json

        from rslora_deploy.exporters.genai.sizes import level4_nbits_bytes
        from rslora_deploy.last_token_logits import lm_head_is_float, logits_positions

        config_path = model_dir / "genai_config.json"
        max_length = profile.max_seq_len
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            max_length = int(config.get("search", {}).get("max_length") or max_length)
        graph = (model_dir / "model.onnx").is_file()
        last = graph and logits_positions(model_dir) == "last"
        float_head = not graph or lm_head_is_float(model_dir)
        level4 = level4_nbits_bytes(model_dir) if graph else 0
        return Shape(max_length, profile.batch_size, last, float_head, level4)

    def budget_terms(
        self, view: ModelView, profile: DeviceProfile, *, shape: Shape | None = None
    ) -> dict[str, int]:
        """lm_head prepack, KV cache, prefill logits and activations at ``shape`` (module doc)."""
        shape = shape or Shape.of(profile)
        seq, batch, io = shape.max_length, shape.batch, self.io_bytes(profile)
        kv = batch * view.layers * 2 * view.kv_heads * view.head_dim * seq
        cpu = profile.export_target == ExportTarget.CPU
        prepack = cpu and shape.float_lm_head
        linear = batch * seq * (4 * view.hidden + 3 * view.intermediate) * io
        scores = batch * view.heads * seq * seq * 4 if profile.attention_scores else 0
        return {
            "lm_head_prepack": view.vocab * view.hidden * io if prepack else 0,
            "nbits_prepack": round(profile.nbits_prepack_factor * shape.level4_nbits_bytes)
            if cpu
            else 0,
            "kv_cache": kv * io,
            "logits": batch * (1 if shape.last_token_logits else seq) * view.vocab * io,
            "activations": round(profile.activation_factor * linear) + scores,
        }

    def measurement_comparable(self, profile: DeviceProfile) -> bool:
        """A CPU run measures a CPU-target package; a CUDA graph on the CPU EP gets fp32 casts."""
        return profile.export_target == ExportTarget.CPU

    def predict_weights(
        self, view: ModelView, profile: DeviceProfile, bits: int, group_size: int
    ) -> tuple[dict[str, int], Shape]:
        """The default layout's bytes (:func:`.sizes.predict_weight_bytes`).

        The layout is what ``build`` resolves for the profile's target with an empty recipe
        (:mod:`.layout`): on CPU the int4 head at accuracy level 4, so the shape carries an int4
        head and the level-4 bytes its packed copy is charged on (projections + head table).
        """
        from dataclasses import replace

        from rslora_deploy.exporters.genai.layout import resolve
        from rslora_deploy.exporters.genai.sizes import predict_weight_bytes

        layout = resolve(GenaiExportConfig(), profile.export_target, profile.name)
        int4_head = layout.lm_head == "int4"
        parts = predict_weight_bytes(view, bits, group_size, profile, lm_head_int4=int4_head)
        level4 = 0
        if layout.target == "cpu" and layout.accuracy_level == 4:
            level4 = parts["projections"] + (parts["lm_head"] if int4_head else 0)
        shape = replace(
            Shape.of(profile), float_lm_head=not layout.lm_head_quantized, level4_nbits_bytes=level4
        )
        return parts, shape

    def runtime_adapters(
        self, model_dir: Path, view: ModelView, adapters: list[RuntimeAdapter], out_dir: Path
    ) -> list[dict[str, Any]]:
        """LoRA branches as graph inputs, an ``.onnx_adapter`` per adapter (:mod:`.adapter_inputs`).

        The adapter files are checked against the graph as written, before the package exists.
        """
        import numpy as np

        from rslora_deploy._fsutil import write_json
        from rslora_deploy.exporters.genai import adapter_inputs as ai
        from rslora_deploy.exporters.genai.adapter_runner import vendor_runner

        model_path = model_dir / "model.onnx"
        every, dtype = ai.read_slots(model_path, view)
        # Each adapter's inputs first (every delta checked), then branches on the nodes in use.
        params = [ai.adapter_parameters(a.name, a.deltas, every, dtype) for a in adapters]
        used = {name.rpartition(".")[0] for p in params for name in p}
        slots = {node: slot for node, slot in every.items() if node in used}
        ai.add_lora_inputs(model_path, slots)
        version = ai.graph_version(model_path)
        out_dir.mkdir(parents=True, exist_ok=True)
        graph_inputs = {
            "model_version": version,
            "dtype": np.dtype(dtype).name,
            "slots": ai.slots_to_json(slots),
        }
        write_json(out_dir / "graph_inputs.json", graph_inputs)
        vendor_runner(model_dir.parent / "runner")
        records = []
        for adapter, values in zip(adapters, params, strict=True):
            path = out_dir / f"{adapter.name}{ai.ADAPTER_SUFFIX}"
            ai.write_adapter_file(values, path, version)
            checked = ai.check_adapter_file(path, model_path, adapter.name)
            records.append({"file": path.name, "model_version": version, **checked})
        return records

    def check_runtime_adapter(self, model_dir: Path, adapter_file: Path, name: str) -> dict:
        """Names, dtypes, shapes and model_version against ``model.onnx``."""
        from rslora_deploy.exporters.genai.adapter_inputs import check_adapter_file

        return check_adapter_file(adapter_file, model_dir / "model.onnx", name)
