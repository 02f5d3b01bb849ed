"""Shared reading of PEFT adapter directories (``adapter_config.json`` + weights).

Weights come from ``adapter_model.safetensors``; the legacy ``adapter_model.bin`` is read only with
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from rslora_deploy.adapters.delta import TensorOverride
from rslora_deploy.adapters.st_io import SafetensorsFile
from rslora_deploy.errors import (
    AdapterFormatError,
    NonFiniteError,
    ShapeMismatchError,
    UnsupportedError,
)
from rslora_deploy.untrusted import MAX_JSON_BYTES, read_limited

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def peft_type(directory: Path, names: frozenset[str]) -> str | None:
    """The ``peft_type`` of a PEFT adapter directory, or None when it holds no PEFT config."""
    if CONFIG_NAME not in names:
        return None
    value = read_config(directory).get("peft_type")
    return value if isinstance(value, str) else None


def read_config(directory: Path) -> dict[str, Any]:
    """Parse ``adapter_config.json`` (E001 when it is not a JSON object)."""
    path = Path(directory) / CONFIG_NAME
    try:
        raw = read_limited(path, MAX_JSON_BYTES, "adapter config", AdapterFormatError)
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterFormatError(
            f"{path} is not valid JSON ({exc}); fix or re-save the adapter", code="E001"
        ) from None
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object", code="E001")
    return cfg


def read_weights(directory: Path) -> tuple[dict[str, np.ndarray], Path]:
    """All adapter tensors as float32 numpy arrays (upcast per spec 6.1), and the file read."""
    directory = Path(directory)
    st_path = directory / SAFETENSORS_NAME
    if st_path.is_file():
        handle = SafetensorsFile(st_path)
        names = handle.keys()  # a list; SafetensorsFile is not a mapping
        return {name: handle.numpy(name).astype(np.float32) for name in names}, st_path
    bin_path = directory / BIN_NAME
    if bin_path.is_file():
        return _read_bin(bin_path), bin_path
    raise AdapterFormatError(
        f"{directory}: no {SAFETENSORS_NAME} (or legacy {BIN_NAME}) next to {CONFIG_NAME}",
        code="E023",
    )


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    import pickle

    import torch

    try:
        # weights_only=True: only tensors and plain containers, never arbitrary objects.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise AdapterFormatError(
            f"{path} could not be loaded safely with torch.load(weights_only=True) "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); re-save "
            "the adapter as safetensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterFormatError(f"{path} does not hold a flat dict of tensors", code="E023")
    return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def strip_prefix(key: str, path: Path) -> str:
    """Remove ``base_model.model.`` (every PEFT key has it)."""
    if not key.startswith(PREFIX):
        raise AdapterFormatError(
            f"{path}: unexpected tensor {key!r}: PEFT keys start with {PREFIX!r}", code="E023"
        )
    return key[len(PREFIX) :]


def pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    r"""Per-module override: first key with ``re.match(rf"(.*\.)?({key})$", module)`` wins.

    This is PEFT's ``rank_pattern``/``alpha_pattern`` rule (spec 6.1), in dict order.
    """
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


_OVERRIDE_HINT = (
    "pass --allow-full-module-overrides (adapter.allow_full_module_overrides=true) "
    "to copy the saved tensors into the base, or retrain without it"
)
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"


def reject_unsupported(
    cfg: dict[str, Any],
    path: Path,
    allow_full_module_overrides: bool = False,
    *,
    allow_dora: bool = False,
) -> None:
    """E070 for PEFT features whose merge is not W + s*B*A (spec 6.1 rejections).

    ``use_dora`` passes when ``allow_dora`` is set (the LoRA importer merges DoRA exactly; VeRA
    has no DoRA variant).

    ``modules_to_save`` and ``trainable_token_indices`` pass when ``allow_full_module_overrides``
    is set; their tensors are then copied (spec 6.1: "then copy tensors with exact shape and dtype
    checks"), see :func:`split_overrides`.
    """
    for field_name in ("modules_to_save", "trainable_token_indices"):
        if cfg.get(field_name) and not allow_full_module_overrides:
            raise UnsupportedError(
                f"{path}: {field_name}={cfg.get(field_name)!r} replaces base tensors instead of "
                f"adding W + s*B*A; {_OVERRIDE_HINT}",
                code="E070",
            )
    checks = [
        (
            "use_dora",
            bool(cfg.get("use_dora")) and not allow_dora,
            "DoRA is merged for LoRA adapters only",
        ),
        ("lora_bias", bool(cfg.get("lora_bias")), "a trained bias is not supported"),
        (
            "layer_replication",
            bool(cfg.get("layer_replication")),
            "layer replication changes the architecture",
        ),
        ("megatron_config", bool(cfg.get("megatron_config")), "Megatron layers are not supported"),
    ]
    for field_name, bad, why in checks:
        if bad:
            raise UnsupportedError(
                f"{path}: {field_name}={cfg.get(field_name)!r} is an unsupported PEFT feature "
                f"({why}); retrain without it",
                code="E070",
            )


_TORCH_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def stored_dtypes(path: Path) -> dict[str, str]:
    """The safetensors dtype string (``F32``, ``BF16``...) of every tensor in the weights file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        handle = SafetensorsFile(path)
        names = handle.keys()
        return {name: handle.dtype(name) for name in names}
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {
        k: _TORCH_TO_ST.get(str(v.dtype).removeprefix("torch."), str(v.dtype))
        for k, v in state.items()
    }


def _token_indices(cfg: dict[str, Any], module: str, path: Path) -> tuple[int, ...]:
    """Rows of ``module`` that ``trainable_token_indices`` names (list, or dict by module suffix).

    A dict key matches when the module path ends with it, PEFT's own rule for these names.
    """
    spec = cfg.get("trainable_token_indices")
    if isinstance(spec, dict):
        hits = [key for key in spec if module.endswith(key)]
        if len(hits) != 1:
            raise AdapterFormatError(
                f"{path}: trainable tokens saved for {module} but trainable_token_indices keys "
                f"{sorted(spec)} match it {len(hits)} times; expected exactly one",
                code="E023",
            )
        spec = spec[hits[0]]
    if (
        not isinstance(spec, list)
        or not spec
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in spec)
        or len(set(spec)) != len(spec)
    ):
        raise AdapterFormatError(
            f"{path}: trainable_token_indices for {module} must be a list of "
            f"distinct non-negative token ids, got {spec!r}",
            code="E001",
        )
    return tuple(spec)


def split_overrides(
    cfg: dict[str, Any], tensors: dict[str, np.ndarray], dtypes: dict[str, str], path: Path
) -> tuple[dict[str, np.ndarray], list[TensorOverride]]:
    """Separate ``modules_to_save`` / trainable-token tensors from the adapter's own tensors.

    PEFT saves a ``modules_to_save`` module's state as ``base_model.model.{module}.{param}`` (the
    wrapper's ``modules_to_save.{adapter}`` is stripped); a key belongs to it when some dotted
    prefix of its module path ends with a listed name (PEFT's ``endswith`` rule, so ``norm``
    also selects ``input_layernorm``). Trainable tokens are saved as
    ``base_model.model.{embedding}.token_adapter.trainable_tokens_delta`` (the new rows).

    Returns:
        (the remaining tensors for the LoRA/VeRA parser, the overrides).

    Raises:
        AdapterFormatError: E023 when a configured feature has no tensor, E001 for bad indices.
        ShapeMismatchError: E022 when the saved rows do not match the index count.
    """
    to_save = list(cfg.get("modules_to_save") or [])
    rest: dict[str, np.ndarray] = {}
    overrides: list[TensorOverride] = []
    for key, array in tensors.items():
        stripped = key[len(PREFIX) :] if key.startswith(PREFIX) else None
        if (
            stripped is not None
            and stripped.endswith(TOKENS_SUFFIX)
            and cfg.get("trainable_token_indices")
        ):
            module = stripped.removesuffix(TOKENS_SUFFIX)
            rows = _token_indices(cfg, module, path)
            if array.ndim != 2 or array.shape[0] != len(rows):
                raise ShapeMismatchError(
                    f"{path}: {key} has shape {list(array.shape)}, expected [{len(rows)}, dim] "
                    "(one row per trainable_token_indices entry)"
                )
            overrides.append(
                TensorOverride(module, "weight", array, dtypes[key], "trainable_tokens", rows=rows)
            )
            continue
        if stripped is not None and to_save and not _is_adapter_key(stripped):
            module, _, param = stripped.rpartition(".")
            parts = module.split(".")
            prefixes = (".".join(parts[: i + 1]) for i in range(len(parts)))
            if module and any(p.endswith(name) for p in prefixes for name in to_save):
                overrides.append(
                    TensorOverride(module, param, array, dtypes[key], "modules_to_save")
                )
                continue
        rest[key] = array
    kinds = {o.kind for o in overrides}
    for field_name, kind in (
        ("modules_to_save", "modules_to_save"),
        ("trainable_token_indices", "trainable_tokens"),
    ):
        if cfg.get(field_name) and kind not in kinds:
            raise AdapterFormatError(
                f"{path}: {field_name} is set but the file holds none of "
                "its tensors; re-save the adapter with PEFT",
                code="E023",
            )
    for override in overrides:
        if not np.all(np.isfinite(override.value)):
            raise NonFiniteError(
                f"{path}: {override.kind} tensor {override.target} contains NaN/Inf"
            )
    return rest, overrides


_ADAPTER_PARTS = frozenset(
    {
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
        "vera_lambda_b",
        "vera_lambda_d",
        "base_layer",
    }
)


def _is_adapter_key(stripped: str) -> bool:
    """LoRA/VeRA tensors (and PEFT's saved base layers), never a full-module override."""
    return not _ADAPTER_PARTS.isdisjoint(stripped.split("."))
