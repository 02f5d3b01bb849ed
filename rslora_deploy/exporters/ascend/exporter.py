"""The ``ascend-om`` exporter: HF checkpoint -> ``model/`` folder an Ascend 310P/310B can run.

``model/`` holds ``decoder.onnx`` (fp16, standard ops, opset 16, IR 8), ``io_spec.json``, the
tokenizer files, ``atc/`` (one compile script per SoC + ``compile.sh``), ``runner/`` (the
self-contained KV-buffer runner) and ``lint/`` (the op tables the lint used). The op lint runs
on every export and fails it on any error; its report goes to ``reports/op_lint.json``.

Budget terms (what this graph allocates, docs/budget.md; weights are measured on disk):

    kv_cache    = layers * 2 * kv_heads * head_dim * (max_length + G) * 2 bytes
                  (the fixed fp16 buffers the runner feeds, plus G new entries returned)
    logits      = vocab * 2                                   (last position only, fp16)
    activations = G * (4 * hidden + 3 * intermediate) * 2
                  + heads * G * (max_length + G) * (4 + 2)    (fp32 scores + fp16 probs)

with G the largest gear. The profile's reserved term stays an allowance until measured on a
device (the runner reports ACL/torch_npu memory where they exist).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rslora_deploy._fsutil import write_json
from rslora_deploy.artifact import Artifact
from rslora_deploy.errors import ConfigError, ExportValidationError, UnsupportedError
from rslora_deploy.exporters.ascend.options import DEFAULT_GEARS, AscendExportConfig

if TYPE_CHECKING:
    from rslora_deploy.exporters.base import RuntimeAdapter
    from rslora_deploy.exporters.options import ExportConfig
    from rslora_deploy.model_view import ModelView
    from rslora_deploy.profiles import DeviceProfile

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json", "chat_template.jinja",
)  # fmt: skip
RUNNER = "runner/ascend_runner.py"


def check_gears(gears: list[int] | tuple[int, ...], max_length: int) -> list[int]:
    """Sorted gears, or :class:`ConfigError` (no gear 1, a gear < 1 or > max_length)."""
    out = sorted({int(g) for g in gears})
    if not out or out[0] < 1 or 1 not in out:
        raise ConfigError(f"export.gears must be positive and include 1 (decode), got {gears}")
    if out[-1] > max_length:
        raise ConfigError(
            f"export.gears: gear {out[-1]} is larger than max_length {max_length} (the KV "
            f"buffer); use gears <= {max_length} or raise export.max_length"
        )
    return out


def eos_ids(model_dir: Path) -> list[int]:
    """EOS token ids from generation_config.json, else config.json."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                return [int(v) for v in (value if isinstance(value, list) else [value])]
    return []


def io_spec(dims: Any, gears: list[int], eos: list[int], socs: list[str]) -> dict[str, Any]:
    """The machine-readable contract of ``decoder.onnx`` (see the runner's docstring)."""
    kv_shape = [1, dims.kv_heads, dims.kv_len, dims.head_dim]
    inputs: list[dict[str, Any]] = [
        {"name": "input_ids", "dtype": "int64", "shape": [1, "S"]},
        {"name": "attention_mask", "dtype": "int64", "shape": [1, "KV_plus_S"]},
        {"name": "position_ids", "dtype": "int64", "shape": [1, "S"]},
    ]
    outputs: list[dict[str, Any]] = [
        {"name": "logits", "dtype": "float16", "shape": [1, 1, dims.vocab]}
    ]
    new_shape = [1, dims.kv_heads, "S", dims.head_dim]
    for i in range(dims.layers):
        for kind in ("key", "value"):
            inputs.append({"name": f"past_{kind}_{i}", "dtype": "float16", "shape": kv_shape})
            outputs.append({"name": f"new_{kind}_{i}", "dtype": "float16", "shape": new_shape})
    return {
        "format": "rslora-deploy ascend io_spec v1",
        "model": "decoder.onnx",
        "om": {soc: f"om/decoder_{soc}.om" for soc in socs},
        "default_soc": socs[0] if socs else None,
        "inputs": inputs,
        "outputs": outputs,
        "gears": gears,
        "max_length": dims.kv_len,
        "padding": "left (pads: token pad_token_id, position 0, attention 0)",
        "pad_token_id": 0,
        "eos_token_ids": eos,
        "kv": {
            "layout": "per layer: past_key_i / past_value_i, slot p holds position p",
            "layers": dims.layers,
            "shape": kv_shape,
            "dtype": "float16",
            "append": "copy the real rows of new_*_i [:, :, pad:, :] into slots filled..filled+n",
        },
    }


ASCEND_USAGE = """Run it with the shipped runner, `model/runner/ascend_runner.py`:

```bash
# Anywhere, on ONNX Runtime (CPU, or the CANN EP where installed):
python model/runner/ascend_runner.py --package model --backend onnxruntime \\
    --prompt 'The capital of France is' --max-new-tokens 32
# On the device: compile the .om once with the ATC scripts, then run it through pyACL:
bash model/atc/compile.sh
python model/runner/ascend_runner.py --package model --backend acl --soc Ascend310P3 \\
    --prompt 'The capital of France is'
```

`model/io_spec.json` gives the static shapes (gears, KV length) the graph was compiled for.
"""


class AscendExporter:
    """Exporter protocol implementation for Ascend 310P/310B (registered as ``ascend-om``)."""

    name: ClassVar[str] = "ascend-om"
    runtime: ClassVar[str] = "onnxruntime (CANN/CPU EP) or pyACL on the ATC .om"
    fused_groups: ClassVar[tuple[tuple[str, ...], ...]] = ()
    config_class: ClassVar[type[AscendExportConfig]] = AscendExportConfig

    def check_config(self, cfg: ExportConfig, profile: DeviceProfile) -> None:
        """The gears against the effective KV length, the profile's SoCs against ATC's list."""
        self._plan(AscendExportConfig.of(cfg, self.name), profile)

    @staticmethod
    def _plan(
        options: AscendExportConfig, profile: DeviceProfile
    ) -> tuple[int, list[int], list[str]]:
        """KV length, gears and SoCs to export for, each checked (:class:`ConfigError`)."""
        from rslora_deploy.exporters.ascend import atc

        max_length = options.max_length or profile.max_seq_len
        gears = check_gears(options.gears, max_length)
        return max_length, gears, atc.check_socs(list(profile.soc_versions))

    def export(
        self, quantized: Artifact, out_dir: Path, cfg: ExportConfig, profile: Any, log_path: Path
    ) -> Artifact:
        """Export, lint (fatal on errors), write scripts, spec, runner and tokenizer."""
        from rslora_deploy.exporters.ascend import atc, op_lint
        from rslora_deploy.exporters.ascend.export import export_decoder
        from rslora_deploy.exporters.ascend.weights import build_decoder

        max_length, gears, socs = self._plan(AscendExportConfig.of(cfg, self.name), profile)
        start = time.perf_counter()
        decoder, facts = build_decoder(quantized.path, max_length)
        out_dir.mkdir(parents=True, exist_ok=True)
        facts.update(export_decoder(decoder, out_dir / "decoder.onnx", max(gears)))
        del decoder
        report = op_lint.lint_model(out_dir / "decoder.onnx", gears, max_length)
        op_lint.write_report(report, out_dir.parent / "reports" / "op_lint.json")
        op_lint.raise_on_errors(report)
        spec = io_spec(_dims(facts), gears, eos_ids(quantized.path), socs)
        atc.write_scripts(out_dir / "atc", spec, socs)
        write_json(out_dir / "io_spec.json", spec)
        _copy_support_files(quantized.path, out_dir)
        log_path.write_text(json.dumps({"lint": report.to_dict(), **facts}, default=str))
        meta = {
            "exporter": self.name,
            "precision": "fp16 weights (no int4: Ascend 310P/310B run int8 at best)",
            "weights_from": facts["weights_from"],
            "architecture": facts["architecture"],
            "opset": facts["opset"],
            "ir_version": facts["ir_version"],
            "gears": gears,
            "max_length": max_length,
            "soc_versions": socs,
            "lint": {
                "passed": True,
                "warnings": len(report.warnings),
                "seconds": report.facts["seconds"],
            },  # fmt: skip
            "export_seconds": round(time.perf_counter() - start, 2),
        }
        return Artifact("onnx-ascend", out_dir, meta)

    def smoke_test(self, model_dir: Path, profile: Any, work: Path) -> dict[str, Any]:
        """Greedy generation through the shipped runner on ONNX Runtime CPU, in a child.

        Returns the verify stage's smoke-report fields (the KV buffer is the full max_length,
        allocated by the runner, so the peak RSS covers it).
        """
        from rslora_deploy.exporters.base import DEFAULT_PROMPT

        run = run_shipped_runner(model_dir, prompt=DEFAULT_PROMPT, max_new_tokens=24)
        spec = json.loads((model_dir / "io_spec.json").read_text())
        return {
            "prompt": DEFAULT_PROMPT,
            "text": run.get("text") or " ".join(map(str, run["new_ids"])),
            "new_tokens": len(run["new_ids"]),
            "prefill_seconds": run["prefill_seconds"],
            "decode_tokens_per_second": run["decode_tokens_per_second"],
            "peak_rss_bytes": int(run.get("peak_rss_bytes") or 0),
            "kv_max_length": int(spec["max_length"]),
            "runtime": f"shipped ascend_runner.py on {run['backend']}",
        }

    def cpu_runnable(self, model_dir: Path, profile: Any, work: Path) -> Path:
        """``decoder.onnx`` runs on ONNX Runtime's CPU EP as shipped."""
        return model_dir

    def measurement_comparable(self, profile: Any) -> bool:
        """No: on the CPU EP the fp16 graph runs through fp32 casts; only an NPU measures it."""
        return False

    def io_bytes(self, profile: Any) -> int:
        """Activations are fp16."""
        return 2

    def usage(self) -> str:
        """The shipped runner: ONNX Runtime anywhere, pyACL on the ATC-compiled .om on a device."""
        return ASCEND_USAGE

    def package_shape(self, model_dir: Path, profile: Any) -> Any:
        """The KV length and gears the package was compiled for (its ``io_spec.json``).

        A folder without the spec (not exported yet) gets the profile's max_seq_len and the
        default gears, which is what an empty recipe exports.
        """
        from rslora_deploy.exporters.base import Shape

        spec_path = Path(model_dir) / "io_spec.json"
        if not spec_path.is_file():
            return Shape(profile.max_seq_len, profile.batch_size, gears=DEFAULT_GEARS)
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        gears = tuple(int(g) for g in spec["gears"])
        return Shape(int(spec["max_length"]), profile.batch_size, gears=gears)

    def budget_terms(self, view: Any, profile: Any, *, shape: Any = None) -> dict[str, int]:
        """kv_cache, logits, activations of this graph at ``shape`` (module docstring).

        ``shape`` is the package's own (:meth:`package_shape`): its KV length and largest gear;
        without one, the profile's max_seq_len and the default gears.
        """
        kv = shape.max_length if shape is not None else profile.max_seq_len
        gear = max((shape.gears if shape is not None else ()) or DEFAULT_GEARS)
        per_token = view.layers * 2 * view.kv_heads * view.head_dim * 2
        return {
            "kv_cache": per_token * (kv + gear),
            "logits": view.vocab * 2,
            "activations": gear * (4 * view.hidden + 3 * view.intermediate) * 2
            + view.heads * gear * (kv + gear) * 6,
        }

    def predict_weights(
        self, view: Any, profile: Any, bits: int, group_size: int
    ) -> tuple[dict[str, int], Any]:
        """fp16 bytes of everything ``decoder.onnx`` holds; ``bits``/``group_size`` do not apply.

        The decoder ships fp16 weights (the checkpoint dequantized, GPTQ's rounding kept), so:

            projections = P * 2              (P = decoder projection weights)
            embedding   = V * H * 2          (one table, shared with lm_head when tied)
            lm_head     = 0 when tied, else V * H * 2
            rope_tables = 2 * max_length * head_dim * 2        (cos and sin, precomputed)
            norms       = (2 * layers + 1) * H * 2

        On the SmolLM2 310P package this sum is 269,554,304 bytes; its initializers hold 16,616
        more (small constants) and the file 272,060,352 (0.9% more: the graph itself). q/k/v
        biases, where a model has them, are of the same small order and not counted.
        """
        from rslora_deploy.exporters.base import Shape
        from rslora_deploy.model_view import decoder_linear_params

        table = view.vocab * view.hidden * 2
        parts = {
            "projections": decoder_linear_params(view) * 2,
            "embedding": table,
            "lm_head": 0 if view.tie_word_embeddings else table,
            "rope_tables": 2 * profile.max_seq_len * view.head_dim * 2,
            "norms": (2 * view.layers + 1) * view.hidden * 2,
        }
        return parts, Shape(profile.max_seq_len, profile.batch_size, gears=DEFAULT_GEARS)

    def runtime_adapters(
        self, model_dir: Path, view: ModelView, adapters: list[RuntimeAdapter], out_dir: Path
    ) -> list[dict[str, Any]]:
        """Not yet: the static graph has no adapter inputs (docs/adapters-runtime.md, Ascend).

        Raises:
            UnsupportedError: always, naming the profiles that take run-time adapters.
        """
        raise UnsupportedError(
            f"the {self.name} exporter has no run-time adapter form yet (the static graph takes "
            f"no adapter inputs); build one merged package per adapter (--adapter DIR), or use a "
            "cpu-2gb / t4-2gb profile for a multi-adapter package"
        )

    def check_runtime_adapter(self, model_dir: Path, adapter_file: Path, name: str) -> dict:
        """No Ascend package holds run-time adapters (:meth:`runtime_adapters`).

        Raises:
            UnsupportedError: always.
        """
        raise UnsupportedError(
            f"adapter {name!r}: an {self.name} package has no run-time adapters; it was not "
            "written by rslora-deploy build"
        )


def _dims(facts: dict[str, Any]) -> Any:
    from rslora_deploy.exporters.ascend.model import DecoderDims

    return DecoderDims(**facts["dims"])


def _copy_support_files(source: Path, out_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out_dir / name)
    here = Path(__file__).resolve().parent
    (out_dir / "runner").mkdir(exist_ok=True)
    shutil.copy2(here / RUNNER, out_dir / RUNNER)
    (out_dir / "lint").mkdir(exist_ok=True)
    for name in ("cann_onnx_ops.json", "ort_cann_graph_allowlist.json"):
        shutil.copy2(here / "data" / name, out_dir / "lint" / name)


def run_shipped_runner(
    model_dir: Path,
    prompt: str | None = None,
    ids: list[int] | None = None,
    max_new_tokens: int = 32,
    ignore_eos: bool = False,
) -> dict[str, Any]:
    """Run ``model_dir/runner/ascend_runner.py`` in a child process (ONNX Runtime backend).

    Raises:
        ExportValidationError: the runner failed (its last stderr line is quoted).
    """
    command = [sys.executable, str(model_dir / RUNNER), "--package", str(model_dir),
               "--backend", "onnxruntime", "--max-new-tokens", str(max_new_tokens)]  # fmt: skip
    command += ["--ids", ",".join(map(str, ids))] if ids is not None else ["--prompt", prompt or ""]
    command += ["--ignore-eos"] if ignore_eos else []
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExportValidationError(
            f"the shipped Ascend runner failed on {model_dir}: {tail[:300]}"
        )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result.setdefault("prompt", prompt)
    result["runtime"] = result.get("backend")
    return result
