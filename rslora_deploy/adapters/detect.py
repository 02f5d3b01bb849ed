"""Detect an adapter directory's format from its files and load it into ModuleDeltas.

The formats are the classes registered in :data:`rslora_deploy.adapters.ADAPTER_FORMATS`; the
built-in ones are

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
from rslora_deploy.adapters import ADAPTER_FORMATS, peft_common
from rslora_deploy.adapters.base import AdapterFormat, AdapterLoadOptions
from rslora_deploy.adapters.delta import ModuleDelta, TensorOverride
from rslora_deploy.errors import AdapterFormatError, InputError, UnsupportedError


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


def _format(name: str) -> AdapterFormat:
    return ADAPTER_FORMATS.get(name)()


def detect_format(directory: Path) -> str:
    """Name the adapter format of a directory: the registered format that claims it.

    Raises:
        InputError: not a directory.
        AdapterFormatError: empty, or no recognizable adapter files (E001).
        UnsupportedError: a PEFT type no registered format reads (E070).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(
            f"adapter path {directory} is not a directory; pass the folder holding "
            "rslora_config.json or adapter_config.json"
        )
    names = frozenset(p.name for p in directory.iterdir())
    if not names:
        raise AdapterFormatError(
            f"adapter directory {directory} is empty; expected "
            "rslora_config.json + rslora_model.safetensors or "
            "adapter_config.json + adapter_model.safetensors",
            code="E001",
        )
    for name in ADAPTER_FORMATS.names():
        if _format(name).claims(directory, names):
            return name
    if peft_common.CONFIG_NAME in names:
        kind = peft_common.read_config(directory).get("peft_type")
        raise UnsupportedError(
            f"{directory}: peft_type={kind!r} is not supported; supported: LORA, VERA",
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
    """Load any registered adapter format into the internal representation.

    Args:
        path: adapter directory.
        allow_unverified_vera_regeneration: allow PEFT VeRA without saved projections (E071).
        base_shapes: module -> (d_out, d_in), for a format that needs them
            (:func:`base_shapes_needed`).
        allow_full_module_overrides: accept PEFT ``modules_to_save``/``trainable_token_indices``
            (E070 otherwise) and return their tensors in ``overrides``.

    Raises:
        RsloraDeployError: the catalogue errors E001-E071 for a bad adapter.
    """
    path = Path(path)
    fmt = detect_format(path)
    options = AdapterLoadOptions(
        allow_unverified_vera_regeneration=allow_unverified_vera_regeneration,
        base_shapes=base_shapes,
        allow_full_module_overrides=allow_full_module_overrides,
    )
    contents = _format(fmt).load(path, options)
    meta: dict[str, Any] = {"format": fmt, "path": str(path), **contents.summary}
    meta["modules"] = len(contents.deltas)
    if contents.overrides:
        meta["overrides"] = [{"tensor": o.target, "kind": o.kind} for o in contents.overrides]
    meta["files"] = file_hashes(path)
    meta["sha256"] = hashlib.sha256(json.dumps(meta["files"], sort_keys=True).encode()).hexdigest()
    if contents.base_hashes:
        meta["base_model"] = contents.base_hashes
    return LoadedAdapter(
        format=fmt,
        deltas=contents.deltas,
        meta=meta,
        base_hashes=contents.base_hashes,
        overrides=contents.overrides,
    )


def base_shapes_needed(path: Path) -> list[str]:
    """Modules whose base-layer shapes the adapter's loader needs (usually none)."""
    return _format(detect_format(path)).base_shapes_needed(Path(path))


def needs_base_shapes(path: Path) -> bool:
    """True when loading the adapter needs the base's layer shapes (VeRA without projections)."""
    return bool(base_shapes_needed(path))
