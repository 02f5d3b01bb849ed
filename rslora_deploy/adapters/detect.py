"""Detect an adapter directory's format from its files and load it into ModuleDeltas.

* ``rslora_config.json`` + ``rslora_model.safetensors``: RS-LoRA v1 (spec 4)
* ``adapter_config.json`` with ``peft_type`` LORA or VERA: PEFT (spec 6.1, 6.2)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rslora_deploy._fsutil import sha256_file
from rslora_deploy.adapters import peft_common, rslora_v1
from rslora_deploy.adapters.delta import ModuleDelta, TensorOverride
from rslora_deploy.errors import AdapterFormatError, InputError, UnsupportedError

FORMATS = ("rslora-v1", "peft-lora", "peft-vera")


@dataclass
class LoadedAdapter:
    """An adapter in the internal representation.

    Attributes:
        format: ``rslora-v1``, ``peft-lora`` or ``peft-vera``.
        deltas: one ModuleDelta per target module.
        meta: JSON-ready summary (files with sha256, module count, trainable parameters, ...).
        base_hashes: ``{"config_sha256", "target_weights_sha256", ...}`` recorded by the adapter,
            or None when the format records none (PEFT).
        overrides: PEFT ``modules_to_save`` / trainable-token tensors, only when loaded with
            ``allow_full_module_overrides`` (spec 6.1).
    """

    format: str
    deltas: list[ModuleDelta]
    meta: dict[str, Any] = field(default_factory=dict)
    base_hashes: dict[str, str] | None = None
    overrides: list[TensorOverride] = field(default_factory=list)


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every regular file in the adapter directory (top level)."""
    out = {}
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            out[path.name] = sha256_file(path)
    return out


def detect_format(directory: Path) -> str:
    """Name the adapter format of a directory.

    Raises:
        InputError: not a directory.
        AdapterFormatError: empty, or no recognizable adapter files (E001).
        UnsupportedError: a PEFT type other than LORA/VERA (E070).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(
            f"adapter path {directory} is not a directory; pass the folder holding "
            "rslora_config.json or adapter_config.json"
        )
    names = {p.name for p in directory.iterdir()}
    if not names:
        raise AdapterFormatError(
            f"adapter directory {directory} is empty; expected "
            "rslora_config.json + rslora_model.safetensors or "
            "adapter_config.json + adapter_model.safetensors",
            code="E001",
        )
    if rslora_v1.CONFIG_NAME in names:
        return "rslora-v1"
    if peft_common.CONFIG_NAME in names:
        peft_type = peft_common.read_config(directory).get("peft_type")
        if peft_type == "LORA":
            return "peft-lora"
        if peft_type == "VERA":
            return "peft-vera"
        raise UnsupportedError(
            f"{directory}: peft_type={peft_type!r} is not supported; supported: LORA, VERA",
            code="E070",
        )
    raise AdapterFormatError(
        f"{directory} holds no adapter: found {sorted(names)[:5]}, expected rslora_config.json "
        "(RS-LoRA v1) or adapter_config.json (PEFT)",
        code="E001",
    )


def load_adapter(
    path: Path,
    *,
    allow_unverified_vera_regeneration: bool = False,
    base_shapes: dict[str, tuple[int, int]] | None = None,
    allow_full_module_overrides: bool = False,
) -> LoadedAdapter:
    """Load any supported adapter directory into the internal representation.

    Args:
        path: adapter directory.
        allow_unverified_vera_regeneration: allow PEFT VeRA without saved projections (E071).
        base_shapes: module -> (d_out, d_in), only needed for that VeRA regeneration.
        allow_full_module_overrides: accept PEFT ``modules_to_save``/``trainable_token_indices``
            (E070 otherwise) and return their tensors in ``overrides``.

    Raises:
        RsloraDeployError: the catalogue errors E001-E071 for a bad adapter.
    """
    path = Path(path)
    fmt = detect_format(path)
    meta: dict[str, Any] = {"format": fmt, "path": str(path)}
    base_hashes = None
    overrides: list[TensorOverride] = []
    if fmt == "rslora-v1":
        deltas, summary, base_hashes = _load_rslora_v1(path)
        meta.update(summary)
    else:
        deltas, summary, overrides = _load_peft(
            fmt,
            path,
            allow_unverified_vera_regeneration=allow_unverified_vera_regeneration,
            base_shapes=base_shapes,
            allow_full_module_overrides=allow_full_module_overrides,
        )
        meta.update(summary, checksums="none recorded by the format")
    meta["modules"] = len(deltas)
    if overrides:
        meta["overrides"] = [{"tensor": o.target, "kind": o.kind} for o in overrides]
    meta["files"] = file_hashes(path)
    meta["sha256"] = hashlib.sha256(json.dumps(meta["files"], sort_keys=True).encode()).hexdigest()
    if base_hashes:
        meta["base_model"] = base_hashes
    return LoadedAdapter(
        format=fmt, deltas=deltas, meta=meta, base_hashes=base_hashes, overrides=overrides
    )


def _load_rslora_v1(path: Path) -> tuple[list[ModuleDelta], dict[str, Any], dict[str, str]]:
    """Read and verify an RS-LoRA v1 checkpoint.

    Returns:
        (deltas, summary for the report, the base-model hashes the checkpoint records).
    """
    ckpt = rslora_v1.read_checkpoint(path)
    cfg = ckpt.config
    base_hashes = {k: v for k, v in cfg.raw["base_model"].items() if isinstance(v, str)}
    summary = {
        "r": cfg.r,
        "k": cfg.k,
        "alpha": cfg.raw["alpha"],
        "effective_scale": cfg.scale,
        "task_id": cfg.task_id,
        "v_sharing": cfg.v_sharing,
        "v_ab_tied": cfg.v_ab_tied,
        "projection": {
            "storage": cfg.storage,
            "generator": cfg.generator,
            "seed": cfg.seed,
            "sharing": cfg.sharing,
            "normalization": cfg.raw["projection"]["normalization"],
            "sha256_all": cfg.raw["projection"]["sha256_all"],
        },
        "checksums": "verified",
        "trainable_parameters": cfg.trainable_parameters(),
    }
    return rslora_v1.checkpoint_deltas(ckpt), summary, base_hashes


def _load_peft(
    fmt: str,
    path: Path,
    *,
    allow_unverified_vera_regeneration: bool,
    base_shapes: dict[str, tuple[int, int]] | None,
    allow_full_module_overrides: bool,
) -> tuple[list[ModuleDelta], dict[str, Any], list[TensorOverride]]:
    """Read a PEFT LoRA or VeRA directory (the importers load lazily: VeRA may need torch)."""
    if fmt == "peft-lora":
        from rslora_deploy.adapters.peft_lora import load_peft_lora

        return load_peft_lora(path, allow_full_module_overrides=allow_full_module_overrides)
    from rslora_deploy.adapters.peft_vera import load_peft_vera

    return load_peft_vera(
        path,
        allow_unverified_regeneration=allow_unverified_vera_regeneration,
        base_shapes=base_shapes,
        allow_full_module_overrides=allow_full_module_overrides,
    )


def needs_base_shapes(path: Path) -> bool:
    """True for a PEFT VeRA directory without saved projections (regeneration needs the base)."""
    path = Path(path)
    if detect_format(path) != "peft-vera":
        return False
    st_path = path / peft_common.SAFETENSORS_NAME
    if st_path.is_file():
        from rslora_deploy.adapters.st_io import SafetensorsFile

        return "base_model.vera_A" not in set(SafetensorsFile(st_path).keys())
    return False
