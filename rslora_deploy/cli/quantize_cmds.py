"""CLI commands of the quantization area: ``quantize`` and ``eval``.

``quantize`` writes its checkpoint into a temporary directory beside ``--out`` and renames it into
place only on success: a failure (bad flag, bad calibration file, NaN, engine error) leaves
nothing at ``--out``. Errors are raised as :class:`~rslora_deploy.errors.RsloraDeployError`; the
main app prints one line and exits 1.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from rslora_deploy._fsutil import atomic_new_dir, write_json
from rslora_deploy.cli._output import OutputFormat, emit
from rslora_deploy.errors import ConfigError, InputError, validation_message

logger = logging.getLogger(__name__)


def _quantize_config(**fields: Any) -> Any:
    from pydantic import ValidationError

    from rslora_deploy.config import QuantizeConfig

    try:
        return QuantizeConfig(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(f"invalid quantize option: {validation_message(exc)}") from None


def field_help(name: str) -> str:
    """A ``[quantize]`` field's description: CLI help comes from the config, written once."""
    from rslora_deploy.config import QuantizeConfig

    return QuantizeConfig.model_fields[name].description or name


def field_default(name: str) -> Any:
    """A ``[quantize]`` field's default, so a flag and its recipe key cannot drift apart."""
    from rslora_deploy.config import QuantizeConfig

    return QuantizeConfig.model_fields[name].get_default(call_default_factory=True)


def _require_dir(path: Path, flag: str) -> Path:
    if not Path(path).is_dir():
        raise InputError(f"{flag} {path} is not a directory; pass a Hugging Face model directory")
    return Path(path)


def quantize(
    model: Annotated[Path, typer.Option(help="Merged full-precision HF model directory.")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write (new or empty).")],
    method: Annotated[str, typer.Option(help=field_help("method"))] = field_default("method"),
    bits: Annotated[int, typer.Option(help=field_help("bits"))] = field_default("bits"),
    group_size: Annotated[int, typer.Option(help=field_help("group_size"))] = field_default(
        "group_size"
    ),
    sym: Annotated[
        bool | None, typer.Option("--sym/--no-sym", help=field_help("sym"))
    ] = field_default("sym"),
    desc_act: Annotated[bool, typer.Option(help=field_help("desc_act"))] = field_default(
        "desc_act"
    ),
    damp_percent: Annotated[float, typer.Option(help=field_help("damp_percent"))] = field_default(
        "damp_percent"
    ),
    calib: Annotated[Path | None, typer.Option(help=field_help("calib_path"))] = None,
    calib_samples: Annotated[int, typer.Option(help=field_help("calib_samples"))] = field_default(
        "calib_samples"
    ),
    calib_seq_len: Annotated[int, typer.Option(help=field_help("calib_seq_len"))] = field_default(
        "calib_seq_len"
    ),
    seed: Annotated[int, typer.Option(help=field_help("seed"))] = field_default("seed"),
    mse: Annotated[float, typer.Option(help=field_help("mse"))] = field_default("mse"),
    compute_dtype: Annotated[str, typer.Option(help=field_help("compute_dtype"))] = field_default(
        "compute_dtype"
    ),
    protect_adapter: Annotated[
        bool, typer.Option(help=field_help("protect_adapter") + " Needs --base.")
    ] = field_default("protect_adapter"),
    protect_ratio: Annotated[float, typer.Option(help=field_help("protect_ratio"))] = field_default(
        "protect_ratio"
    ),
    base: Annotated[
        Path | None, typer.Option(help="Base model before merging (for --protect-adapter).")
    ] = None,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="text or json.")
    ] = OutputFormat.TEXT,
) -> None:
    """Quantize a merged model into a GPTQ/AWQ checkpoint (atomic: nothing at --out on error)."""
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.quantizers.base import QuantizeExtras
    from rslora_deploy.stages.quantize import quantize_model

    _require_dir(model, "--model")
    if calib is not None and not calib.is_file():
        raise InputError(f"--calib {calib} does not exist; pass a .txt or .jsonl file")
    cfg = _quantize_config(
        method=method, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
        damp_percent=damp_percent, calib_path=calib, calib_samples=calib_samples,
        calib_seq_len=calib_seq_len, seed=seed, mse=mse, compute_dtype=compute_dtype,
    )  # fmt: skip
    extras, protection = QuantizeExtras(), None
    if protect_adapter:
        if base is None:
            raise ConfigError("--protect-adapter needs --base (the model before merging)")
        extras, protection = _protection(_require_dir(base, "--base"), model, cfg, protect_ratio)
    with atomic_new_dir(out) as staging:
        art = quantize_model(Artifact("hf", model), staging / "q", cfg, extras=extras)
        if art.meta.get("prequantized"):
            shutil.copytree(art.path, staging / "q")
        for item in (staging / "q").iterdir():
            item.rename(staging / item.name)
        (staging / "q").rmdir()
    meta = {**art.meta, "path": str(out), "protection": protection}
    emit(
        meta,
        fmt,
        f"quantized {model} -> {out} ({meta.get('method')}, {bits}-bit, "
        f"group {group_size}, {meta.get('seconds')} s)",
    )


def _protection(base: Path, model: Path, cfg: Any, ratio: float) -> tuple[Any, dict[str, Any]]:
    from rslora_deploy.exporters import get_exporter
    from rslora_deploy.quantizers.protection import plan_protection

    # A standalone quantize has no profile: plan for the default exporter's fused nodes.
    fused = get_exporter("onnxruntime-genai").fused_groups
    return plan_protection(base, model, cfg, ratio, fused)


def eval_cmd(
    model: Annotated[Path, typer.Option(help="Full-precision (merged) HF model: the reference.")],
    quantized: Annotated[Path | None, typer.Option(help="Quantized HF checkpoint.")] = None,
    onnx: Annotated[
        Path | None,
        typer.Option(help="onnxruntime-genai model folder (alone or with --quantized)."),
    ] = None,
    base: Annotated[
        Path | None, typer.Option(help="Base model before merging: adds adapter survival.")
    ] = None,
    windows: Annotated[int, typer.Option(help="Evaluation windows.")] = 8,
    window_len: Annotated[int, typer.Option(help="Tokens per window, BOS included.")] = 512,
    survival_threshold: Annotated[
        float, typer.Option(help="Warn below this retained fraction.")
    ] = 0.5,
    survival_genre: Annotated[
        str | None,
        typer.Option(help="Brown genre of the adapter's domain for survival (e.g. government)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="text or json.")
    ] = OutputFormat.TEXT,
) -> None:
    """Perplexity, greedy agreement, ONNX-vs-PyTorch logit error and adapter survival.

    Any of --quantized and --onnx may be given; each is compared with --model. The models are
    evaluated one at a time, so memory holds one model plus one window's logits.
    """
    from rslora_deploy.config import EvalConfig
    from rslora_deploy.evaluation.quality import evaluate_build, evaluate_models

    _require_dir(model, "--model")
    for path, flag in ((quantized, "--quantized"), (onnx, "--onnx"), (base, "--base")):
        if path is not None and not Path(path).is_dir():
            raise InputError(f"{flag} {path} is not a directory")
    if base is not None and quantized is None and onnx is None:
        raise ConfigError(
            "--base adds adapter survival, which is measured on a quantized model; "
            "pass --quantized or --onnx too"
        )
    try:
        eval_cfg = EvalConfig(windows=windows, window_len=window_len)
    except ValueError as exc:
        raise ConfigError(f"invalid eval option: {exc}") from None
    if quantized is None and onnx is None:
        report = evaluate_models({"merged": model}, "merged", windows, window_len)
    else:
        report = evaluate_build(
            model,
            quantized,
            onnx,
            eval_cfg,
            base,
            survival_threshold=survival_threshold,
            survival_genre=survival_genre,
        )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, report)
    lines = [
        f"{name}: perplexity {m['perplexity']:.3f}"
        + (f", agreement {m['greedy_agreement']:.3f}" if "greedy_agreement" in m else "")
        for name, m in report["models"].items()
    ]
    lines += [
        f"relative logit error {k}: {v:.4f}"
        for k, v in report.get("relative_logit_error", {}).items()
    ]
    if "survival" in report:
        lines.append(f"adapter survival (retained): {report['survival']['retained']:.3f}")
    emit(report, fmt, "\n".join(lines))


def register(app: typer.Typer) -> None:
    """Attach ``quantize`` and ``eval`` to ``app``."""
    app.command("quantize")(quantize)
    app.command("eval")(eval_cmd)
