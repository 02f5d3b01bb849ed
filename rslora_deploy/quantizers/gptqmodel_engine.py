"""Shared glue for the gptqmodel 7.6.0 engine (GPTQ and AWQ handlers).

Workarounds measured on this project's CPU machines (docs/stack-notes): ``GPTQMODEL_CPU_WORKERS``
must be set (7.6.0 otherwise fails to size its CPU pool), ``GPTQModel.load`` takes the
QuantizeConfig and no ``device=``. After saving we (1) drop gptqmodel's absolute
``offload_to_disk_path`` (a /tmp path of this machine: noise in a shipped checkpoint) and
(2) restore the unquantized tensors (embeddings, norms, untied lm_head) to the source's exact
values and dtype, because calibration ran in ``compute_dtype`` (bf16 by default) and gptqmodel
saves the whole model in it: keeping ``lm_head`` fp32 must mean fp32, as for RTN. A tensor is
restored only when it equals the source rounded to bf16; tensors the engine changed (AWQ folds
its channel scales into the RMSNorm weights) keep the engine's values, cast to the source dtype.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rslora_deploy._fsutil import write_json
from rslora_deploy.errors import NonFiniteQuantizationError, QuantizationError, UnsupportedError
from rslora_deploy.quantizers import checkpoint

if TYPE_CHECKING:
    import torch

    from rslora_deploy.config import QuantizeConfig
    from rslora_deploy.data.calibration import CalibrationSet

logger = logging.getLogger(__name__)


def prepare_env() -> None:
    """Set the CPU worker count gptqmodel 7.6.0 needs before it is imported."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))


def torch_dtype(name: str) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16`` (only float dtypes are accepted)."""
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise QuantizationError(f"compute_dtype {name!r} is not a torch float dtype")
    return dtype


def load(model_dir: Path, qcfg: Any, dtype_name: str) -> Any:
    """``GPTQModel.load`` with errors turned into one-line :class:`UnsupportedError`."""
    prepare_env()
    from gptqmodel import GPTQModel

    try:
        return GPTQModel.load(str(model_dir), qcfg, dtype=torch_dtype(dtype_name))
    except (ValueError, TypeError, KeyError, NotImplementedError, AttributeError) as exc:
        raise UnsupportedError(
            f"gptqmodel 7.6.0 cannot load {model_dir} for quantization "
            f"({type(exc).__name__}: {str(exc)[:200]}); use --method rtn or a supported "
            "architecture (Llama, Qwen2, Gemma-3 with gptq, ...)"
        ) from exc


def run_quantize(model: Any, calibration: list[dict[str, list[int]]], **kwargs: Any) -> None:
    """``model.quantize`` with NaN/Inf failures reported as :class:`NonFiniteError`."""
    try:
        model.quantize(calibration, **kwargs)
    except (ValueError, RuntimeError, FloatingPointError) as exc:
        text = str(exc)
        if any(
            word in text.lower() for word in ("nan", "inf", "not positive-definite", "cholesky")
        ):
            raise NonFiniteQuantizationError(
                f"non-finite values during calibration ({text[:200]}); check the merged model "
                "for NaN/Inf weights, or raise quantize.damp_percent"
            ) from exc
        raise QuantizationError(
            f"gptqmodel quantization failed ({type(exc).__name__}: {text[:200]}); "
            "set RSLORA_DEPLOY_DEBUG=1 for the traceback"
        ) from exc


def quantize_and_save(
    method: str,
    model_dir: Path,
    out_dir: Path,
    qcfg: Any,
    cfg: QuantizeConfig,
    calib: CalibrationSet | None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The GPTQ and AWQ handlers' common run: load, calibrate, save, finalize.

    Args:
        method: the handler's name, for the error message.
        model_dir: the merged full-precision model.
        out_dir: existing, empty directory for the checkpoint.
        qcfg: gptqmodel's QuantizeConfig for the method.
        cfg: our quantize config (``compute_dtype``, ``batch_size``).
        calib: the calibration set; required.
        kwargs: passed on to ``model.quantize`` (e.g. AWQ's ``backend``).

    Returns:
        :func:`finalize_checkpoint`'s counts.

    Raises:
        QuantizationError: no calibration data, or the engine failed.
    """
    if calib is None:
        raise QuantizationError(f"{method} needs calibration data; the stage passed none")
    model = load(model_dir, qcfg, cfg.compute_dtype)
    run_quantize(model, calib.as_gptqmodel(), batch_size=cfg.batch_size, **kwargs)
    model.save(str(out_dir))
    del model
    return finalize_checkpoint(model_dir, out_dir)


def finalize_checkpoint(model_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Strip machine paths from the configs and restore unquantized tensors to the source's.

    Returns:
        The counts of unquantized tensors restored exactly and of those the engine modified.

    Raises:
        NonFiniteQuantizationError: a quantized or a source tensor holds NaN/Inf.
    """
    from safetensors.torch import load_file, save_file

    _clean_configs(model_dir, out_dir)
    (out_dir / "quant_log.csv").unlink(missing_ok=True)
    source: dict[str, torch.Tensor] = {}
    for path in checkpoint.weight_files(model_dir):
        source.update(load_file(path))
    restored = 0
    modified = 0
    for path in checkpoint.weight_files(out_dir):
        tensors = load_file(path)
        file_restored, file_modified = _restore_unquantized(tensors, source)
        restored += file_restored
        modified += file_modified
        save_file(tensors, str(path), metadata={"format": "pt"})
    return {"unquantized_tensors_restored": restored, "unquantized_tensors_modified": modified}


def _clean_configs(model_dir: Path, out_dir: Path) -> None:
    """Drop ``offload_to_disk_path`` and give config.json the source's dtype entries back."""
    for name in ("config.json", "quantize_config.json"):
        path = out_dir / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        qcfg = data.get("quantization_config", data)
        (qcfg.get("meta") or {}).pop("offload_to_disk_path", None)
        if name == "config.json":
            source_cfg = checkpoint.read_config(model_dir)
            for key in ("dtype", "torch_dtype"):
                if key in source_cfg:
                    data[key] = source_cfg[key]
        write_json(path, data)


def _restore_unquantized(
    tensors: dict[str, torch.Tensor], source: dict[str, torch.Tensor]
) -> tuple[int, int]:
    """Put the source's values and dtype back into one saved file's unquantized tensors.

    ``tensors`` is edited in place.

    Returns:
        (tensors restored exactly, tensors the engine modified and that keep its values).
    """
    import torch

    restored = 0
    modified = 0
    for key, tensor in tensors.items():
        if not torch.isfinite(
            tensor.float() if tensor.is_floating_point() else tensor.double()
        ).all():
            raise NonFiniteQuantizationError(
                f"quantized tensor {key} contains NaN/Inf; raise quantize.damp_percent or "
                "check the merged model's weights"
            )
        if key.endswith(".scales") and tensor.dtype == torch.bfloat16:
            # AWQ saves its scales in the bf16 compute dtype; AutoAWQ's GEMM format and
            # its loaders use fp16. bf16 -> fp16 is exact for scales (8-bit mantissa fits in
            # 11, and group scales sit far inside fp16's range).
            tensors[key] = tensor.to(torch.float16)
        original = source.get(key)
        if original is None or original.shape != tensor.shape:
            continue
        if not torch.isfinite(original).all():
            raise NonFiniteQuantizationError(
                f"source tensor {key} contains NaN/Inf; fix the merged model first"
            )
        if torch.equal(tensor, original.to(tensor.dtype)):
            # Only the dtype changed (bf16 calibration): put the exact source values back.
            tensors[key] = original.contiguous()
            restored += 1
        else:
            # The engine changed the values on purpose (AWQ folds its channel scales into
            # the preceding RMSNorm): keep them, in the source dtype.
            tensors[key] = tensor.to(original.dtype).contiguous()
            modified += 1
    return restored, modified
