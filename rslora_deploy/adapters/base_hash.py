r"""Fingerprints of a base model directory that bind an adapter to the weights it was trained on.

Spec 4.1: ``config_sha256`` is SHA-256 of the raw ``config.json`` bytes;
``target_weights_sha256`` is SHA-256 over, for each target module sorted by name, the line
``f"{module}\t{dtype}\t{shape}\n"`` (stored dtype and shape, ``x``-joined) followed by the raw
stored bytes of ``{module}.weight``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from rslora_deploy.adapters.st_io import SafetensorsFile
from rslora_deploy.errors import InputError


def safetensors_files(base_dir: Path) -> list[Path]:
    """The base's weight files: the index's shards, else every ``*.safetensors`` in the dir."""
    base_dir = Path(base_dir)
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [base_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise InputError(
            f"{base_dir} has no *.safetensors weights; only safetensors bases are loaded (no "
            "pickle). Convert the model with save_pretrained(safe_serialization=True)"
        )
    return files


def config_sha256(base_dir: Path) -> str:
    """SHA-256 of the base's raw config.json bytes."""
    path = Path(base_dir) / "config.json"
    if not path.is_file():
        raise InputError(f"{base_dir} has no config.json; pass a Hugging Face model directory")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def target_weights_sha256(
    base_dir: Path, modules: Iterable[str], live_names: Mapping[str, str] | None = None
) -> tuple[str, list[str]]:
    """Hash of the target modules' stored weights.

    ``modules`` are the names recorded in the adapter and enter the hash lines (spec 4.1).
    ``live_names`` (from a user rename map, spec 5.2 step 1) says under which name the base stores
    a module's weight; the recorded name is tried when the live one is absent. So a base whose
    modules were renamed still matches the adapter's hash when its weights are the same.

    Returns:
        (hex digest, names of modules whose ``.weight`` is not in any file). A missing weight
        (e.g. an lm_head tied to the embedding and not saved) is hashed as absent, so the digest
        still differs from one computed where it exists.
    """
    index: dict[str, SafetensorsFile] = {}
    for path in safetensors_files(base_dir):
        handle = SafetensorsFile(path)
        index.update(dict.fromkeys(handle.keys(), handle))
    digest = hashlib.sha256()
    missing: list[str] = []
    for module in sorted(modules):
        key = f"{(live_names or {}).get(module, module)}.weight"
        if key not in index:
            key = f"{module}.weight"
        owner = index.get(key)
        if owner is None:
            missing.append(module)
            digest.update(f"{module}\tABSENT\t\n".encode())
            continue
        shape = "x".join(str(d) for d in owner.shape(key))
        digest.update(f"{module}\t{owner.dtype(key)}\t{shape}\n".encode())
        digest.update(owner.raw_bytes(key))
    return digest.hexdigest(), missing
