"""Op lint: will this ONNX graph run on the NPU, whole, for every shape gear?

Checks, each against a data file kept in the package with its source and version
(``data/ort_cann_graph_allowlist.json`` from onnxruntime's ``cann_graph.cc``,
``data/cann_onnx_ops.json`` from Huawei's per-operator pages):

* every node is in the ``ai.onnx`` domain and its op type is in ONNX Runtime's CANN graph
  allowlist (anything else falls back to the CPU);
* the model's opset is within 14-17 and, for ops with a CANN page, within that op's documented
  opset range; the first input's dtype is one the page names;
* IR version <= 8; no bfloat16 or float64 tensor anywhere (initializers, graph I/O, inferred
  intermediates, Cast targets);
* known traps: Trilu with a second (``k``) input;
* for every gear S, substituting S (and KV+S) into the inputs leaves no symbolic or unknown
  dimension anywhere once ONNX shape inference (with data propagation) has run.

Errors fail the build (the message names the nodes); warnings (ops without a CANN page here,
all-constant nodes ORT's CANN EP would run one by one) go to ``reports/op_lint.json`` only.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rslora_deploy._fsutil import write_json
from rslora_deploy.errors import ExportValidationError

logger = logging.getLogger(__name__)

OPSET_RANGE = (14, 17)
MAX_IR_VERSION = 8
FORBIDDEN_DTYPES = {"bfloat16", "double"}
DATA_FILES = ("cann_onnx_ops.json", "ort_cann_graph_allowlist.json")


class LintError(ExportValidationError):
    """The graph would not run whole on the NPU (lists the offending nodes)."""


@dataclass
class LintReport:
    """Findings of one lint run."""

    errors: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def error(self, node: str, op_type: str, reason: str) -> None:
        """Record an error."""
        self.errors.append({"node": node, "op_type": op_type, "reason": reason})

    def warn(self, node: str, op_type: str, reason: str) -> None:
        """Record a warning."""
        self.warnings.append({"node": node, "op_type": op_type, "reason": reason})

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``reports/op_lint.json``)."""
        return {
            "passed": not self.errors,
            "unsupported_nodes": len({e["node"] for e in self.errors}),
            "errors": self.errors,
            # One line per (op type, reason) with its node count: the per-node list below runs
            # to ~1,500 entries on SmolLM2, almost all "no CANN page here" for 13 op types.
            "warning_summary": [
                {"op_type": op_type, "reason": reason, "nodes": count}
                for (op_type, reason), count in sorted(
                    Counter((w["op_type"], w["reason"]) for w in self.warnings).items()
                )
            ],
            "warnings": self.warnings,
            **self.facts,
        }


def load_data(name: str) -> dict[str, Any]:
    """One of :data:`DATA_FILES`, from the package."""
    text = (
        resources.files("rslora_deploy.exporters.ascend")
        .joinpath("data")
        .joinpath(name)
        .read_text()
    )
    data: dict[str, Any] = json.loads(text)
    return data


def _dtype_name(elem_type: int) -> str:
    import onnx

    return (
        str(onnx.helper.tensor_dtype_to_np_dtype(elem_type).name)
        if elem_type != 16
        else ("bfloat16")
    )


def _check_header(model: Any, report: LintReport) -> int:
    opset = 0
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = imp.version
        else:
            report.error("<model>", "", f"opset import of non-standard domain {imp.domain!r}")
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        report.error(
            "<model>", "", f"ai.onnx opset {opset} outside {OPSET_RANGE[0]}-{OPSET_RANGE[1]}"
        )
    if model.ir_version > MAX_IR_VERSION:
        report.error("<model>", "", f"IR version {model.ir_version} > {MAX_IR_VERSION}")
    return opset


def _value_types(model: Any) -> dict[str, str]:
    graph = model.graph
    types = {t.name: _dtype_name(t.data_type) for t in graph.initializer}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.HasField("tensor_type"):
            types[value.name] = _dtype_name(value.type.tensor_type.elem_type)
    return types


def _check_node(
    node: Any, opset: int, types: dict[str, str], inits: set[str], report: LintReport
) -> None:
    cann, ort = _tables()
    name, op = node.name or node.output[0], node.op_type
    if node.domain not in ("", "ai.onnx"):
        report.error(name, op, f"domain {node.domain!r} is not ai.onnx")
        return
    if op not in ort:
        report.error(name, op, "not in ONNX Runtime's CANN graph allowlist (cann_graph.cc)")
    spec = cann.get(op)
    if spec is None:
        report.warn(name, op, "not verified against a CANN operator page (cann_onnx_ops.json)")
    else:
        low, high = spec["opsets"]
        if not low <= opset <= high:
            report.error(name, op, f"CANN documents {op} for opsets {low}-{high}, model is {opset}")
        dtype = types.get(node.input[0]) if node.input else None
        if dtype and "input_dtypes" in spec and dtype not in _np_names(spec["input_dtypes"]):
            report.error(name, op, f"input dtype {dtype} not in CANN's {spec['input_dtypes']}")
    if op == "Trilu" and len(node.input) > 1 and node.input[1]:
        report.error(name, op, "two-input Trilu (k as a tensor) is a known ATC failure")
    if op == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), 0)
        if _dtype_name(to) in FORBIDDEN_DTYPES:
            report.error(name, op, f"casts to {_dtype_name(to)}")
    if node.input and all(i in inits for i in node.input if i):
        report.warn(name, op, "all inputs are initializers: ORT's CANN EP runs it as a single op")


def _np_names(names: list[str]) -> set[str]:
    alias = {"float": "float32", "double": "float64"}
    return {alias.get(n, n) for n in names}


_TABLES: tuple[dict[str, Any], set[str]] | None = None


def _tables() -> tuple[dict[str, Any], set[str]]:
    global _TABLES
    if _TABLES is None:
        cann = load_data("cann_onnx_ops.json")["ops"]
        ort = set(load_data("ort_cann_graph_allowlist.json")["ops"])
        _TABLES = (cann, ort)
    return _TABLES


def _shape_skeleton(model: Any) -> Any:
    """A copy whose large initializers are graph inputs of the same type (shape inference only)."""
    import onnx

    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    keep, moved = [], []
    for init in skeleton.graph.initializer:
        if init.ByteSize() > 4096:
            moved.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims))
        else:
            keep.append(init)
    del skeleton.graph.initializer[:]
    skeleton.graph.initializer.extend(keep)
    skeleton.graph.input.extend(moved)
    return skeleton


def check_gears(model: Any, gears: list[int], kv_len: int, report: LintReport) -> dict[str, Any]:
    """Shape-infer the graph once per gear; every dimension must come out static."""
    import onnx

    skeleton = _shape_skeleton(model)
    result: dict[str, Any] = {}
    for gear in gears:
        fixed = onnx.ModelProto()
        fixed.CopyFrom(skeleton)
        for value in fixed.graph.input:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param == "S":
                    dim.dim_value = gear
                elif dim.dim_param == "KV_plus_S":
                    dim.dim_value = kv_len + gear
        try:
            inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=True, data_prop=True)
        except onnx.shape_inference.InferenceError as exc:
            report.error("<model>", "", f"gear {gear}: shape inference failed: {exc}")
            continue
        dynamic = _dynamic_values(inferred)
        for name in dynamic[:20]:
            report.error(name, "", f"gear {gear}: dimension still symbolic or unknown")
        result[str(gear)] = {"static": not dynamic, "dynamic_values": len(dynamic)}
    return result


def _dynamic_values(model: Any) -> list[str]:
    graph = model.graph
    produced = {o for n in graph.node for o in n.output}
    known = {v.name: v for v in [*graph.value_info, *graph.output]}
    bad = []
    for name in sorted(produced):
        value = known.get(name)
        if value is None or not value.type.HasField("tensor_type"):
            bad.append(name)
            continue
        shape = value.type.tensor_type.shape
        if not value.type.tensor_type.HasField("shape") or any(
            not d.HasField("dim_value") for d in shape.dim
        ):
            bad.append(name)
    return bad


def lint_model(model_path: Path, gears: list[int], kv_len: int) -> LintReport:
    """Lint the ONNX file at ``model_path`` (see the module docstring for the checks)."""
    import onnx

    start = time.perf_counter()
    model = onnx.load(str(model_path), load_external_data=False)
    report = LintReport()
    opset = _check_header(model, report)
    try:
        onnx.checker.check_model(_shape_skeleton(model))
    except onnx.checker.ValidationError as exc:
        report.error("<model>", "", f"not a valid ONNX model: {str(exc).splitlines()[0][:200]}")
    typed = onnx.shape_inference.infer_shapes(_shape_skeleton(model), data_prop=False)
    types = _value_types(typed)
    for name, dtype in types.items():
        if dtype in FORBIDDEN_DTYPES or dtype == "float64":
            report.error(name, "", f"tensor of dtype {dtype}")
    inits = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        _check_node(node, opset, types, inits, report)
    report.facts = {
        "model": model_path.name,
        "opset": opset,
        "ir_version": model.ir_version,
        "nodes": len(model.graph.node),
        "op_types": dict(Counter(n.op_type for n in model.graph.node).most_common()),
        "gears": check_gears(model, gears, kv_len, report),
        "kv_len": kv_len,
        "sources": {
            f: {k: load_data(f).get(k) for k in ("source_url", "version")} for f in DATA_FILES
        },  # fmt: skip
    }
    report.facts["seconds"] = round(time.perf_counter() - start, 3)
    return report


def raise_on_errors(report: LintReport) -> None:
    """Raise :class:`LintError` naming the offending nodes when the report has errors."""
    if not report.errors:
        return
    shown = "; ".join(
        f"{e['node']} ({e['op_type']}): {e['reason']}"
        if e["op_type"]
        else f"{e['node']}: {e['reason']}"
        for e in report.errors[:5]
    )
    more = f" and {len(report.errors) - 5} more" if len(report.errors) > 5 else ""
    raise LintError(
        f"op lint failed, {len(report.errors)} problem(s): {shown}{more}; the graph would not run "
        "whole on the NPU (see reports/op_lint.json)"
    )


def write_report(report: LintReport, path: Path) -> None:
    """Write ``op_lint.json``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, report.to_dict())


def lint_package(path: Path) -> LintReport:
    """Lint a package (or its ``model/``): its decoder and its ATC scripts.

    The decoder is checked against its ``io_spec.json``, the ATC scripts' input names and shapes
    against the graph's inputs.

    Raises:
        InputError: no ``io_spec.json`` (not an ascend-om package).
    """
    from rslora_deploy.errors import InputError
    from rslora_deploy.exporters.ascend import atc

    model_dir = path / "model" if (path / "model").is_dir() else path
    spec_path = model_dir / "io_spec.json"
    if not spec_path.is_file():
        raise InputError(
            f"{path} has no io_spec.json; `lint` checks packages built with an ascend-om "
            "profile (rslora-deploy build --profile ascend-310p-2gb)"
        )
    spec = json.loads(spec_path.read_text())
    report = lint_model(model_dir / spec["model"], spec["gears"], int(spec["max_length"]))
    expected = {
        "input_shape": atc.input_shape_arg(spec),
        "dynamic_dims": atc.dynamic_dims_arg(spec),
    }
    for script in sorted((model_dir / "atc").glob("atc_*.sh")):
        flags = atc.parse_script(script)
        for key, value in expected.items():
            if flags.get(key) != value:
                report.error(script.name, "", f"--{key} does not match the graph's inputs")
    report.facts["atc_scripts"] = sorted(p.name for p in (model_dir / "atc").glob("atc_*.sh"))
    return report
