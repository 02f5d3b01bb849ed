"""Writing RS-LoRA v1 checkpoints (spec section 4), used by the trainer, tests and converters.

The config bytes are written first and their SHA-256 goes into the safetensors metadata
(``config_sha256``), which binds the two files (E002 on mismatch at load).
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from rslora_deploy.adapters import rsg
from rslora_deploy.adapters.rslora_v1 import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    effective_scale,
    magnitude_name,
    parse_config,
    projection_key,
    stored_p_names,
)

_NP_DTYPE = {"float32": np.float32, "float64": np.float64}


@dataclass
class RsloraSpec:
    """Everything that goes into ``rslora_config.json`` except the computed checksums.

    ``modules`` maps a module path to ``{"d_in", "d_out", "layout"[, "out_slice"]}``. ``dora``
    writes ``"dora": true`` (our extension, docs/rslora-format.md): every module then needs its
    magnitude tensor ``{module}.rslora_magnitude`` among the tensors given to
    :func:`write_checkpoint`.
    """

    modules: dict[str, dict[str, Any]]
    r: int
    k: int
    base_model: dict[str, str]
    seed: int | None = 0
    task_id: str = ""
    alpha: float = 1.0
    scaling_rule: str = "alpha_over_r"
    normalization: str = "inv_sqrt_k"
    storage: str = "seed"
    generator: str = "rsg"
    sharing: str = "per_module"
    v_sharing: str = "per_module"
    v_groups: dict[str, list[str]] | None = None
    v_ab_tied: bool = False
    dtype_v: str = "float32"
    init: dict[str, Any] = field(default_factory=lambda: {"v_A": "rsg-uniform", "v_B": "zeros"})
    created_by: dict[str, Any] | None = None
    dora: bool = False

    def pkeys(self) -> dict[str, tuple[int, int]]:
        """P~ key -> (d_out, d_in) for every distinct basis."""
        out = {}
        for name, m in self.modules.items():
            out[projection_key(self.sharing, name, int(m["d_out"]), int(m["d_in"]))] = (
                int(m["d_out"]),
                int(m["d_in"]),
            )
        return out


def basis(spec: RsloraSpec, pkey: str, d_out: int, d_in: int) -> tuple[np.ndarray, np.ndarray]:
    """The RSG-1 bases (P~_A (k, r, d_in), P~_B (k, d_out, r)) of one key."""
    assert spec.seed is not None
    key_a = rsg.derive_key(spec.seed, spec.task_id, pkey, "A")
    key_b = rsg.derive_key(spec.seed, spec.task_id, pkey, "B")
    return rsg.generate(key_a, spec.k, spec.r, d_in), rsg.generate(key_b, spec.k, d_out, spec.r)


def _checksums(
    spec: RsloraSpec, bases: dict[str, tuple[np.ndarray, np.ndarray]] | None
) -> dict[str, dict[str, str]]:
    sums = {}
    for pkey, (d_out, d_in) in spec.pkeys().items():
        if bases is not None:
            p_a, p_b = bases[pkey]
            sums[pkey] = {"A": rsg.tensor_sha256(p_a), "B": rsg.tensor_sha256(p_b)}
            continue
        assert spec.seed is not None
        entry = {}
        for factor, rows, cols in (("A", spec.r, d_in), ("B", d_out, spec.r)):
            key = rsg.derive_key(spec.seed, spec.task_id, pkey, factor)
            entry[factor] = rsg.slabs_sha256(rsg.iter_slabs(key, spec.k, rows, cols))
        sums[pkey] = entry
    return sums


def config_dict(
    spec: RsloraSpec, bases: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
) -> dict[str, Any]:
    """The JSON config of ``spec`` (bases given for external/stored P~, else regenerated)."""
    sums = _checksums(spec, bases)
    projection: dict[str, Any] = {"storage": spec.storage}
    if spec.generator == "rsg":
        projection["seed"] = spec.seed
        projection["generator"] = {"name": "rsg", "version": 1}
    else:
        projection["generator"] = {"name": "external"}
    projection.update(
        {
            "sharing": spec.sharing,
            "normalization": spec.normalization,
            "sha256": sums,
            "sha256_all": rsg.aggregate_sha256(sums),
        }
    )
    cfg: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": spec.base_model,
        "task_id": spec.task_id,
        "r": spec.r,
        "k": spec.k,
        "alpha": spec.alpha,
        "scaling_rule": spec.scaling_rule,
        "effective_scale": effective_scale(
            spec.alpha, spec.r, spec.k, spec.scaling_rule, spec.normalization
        ),
        "modules": spec.modules,
        "v_sharing": spec.v_sharing,
        "v_ab_tied": spec.v_ab_tied,
        "projection": projection,
        "dtype": {"v": spec.dtype_v, "P": "float32"},
        "init": spec.init,
        "created_by": spec.created_by
        or {"tool": "rslora-deploy", "numpy": np.__version__, "python": platform.python_version()},
    }
    if spec.v_sharing == "grouped":
        cfg["v_groups"] = spec.v_groups or {}
    if spec.dora:  # only then, so a plain adapter's config bytes stay the spec's
        cfg["dora"] = True
    return cfg


def _check_magnitudes(spec: RsloraSpec, tensors: dict[str, np.ndarray]) -> None:
    """Refuse to write a DoRA flag without every magnitude, or a magnitude without the flag."""
    given = {name for name in tensors if name in {magnitude_name(m) for m in spec.modules}}
    if spec.dora and (missing := sorted({magnitude_name(m) for m in spec.modules} - given)):
        raise ValueError(f"dora=True needs a magnitude per module; missing {missing[:3]}")
    if not spec.dora and given:
        raise ValueError(f"magnitude tensors {sorted(given)[:3]} given but dora=False")


def write_checkpoint(
    out_dir: Path,
    spec: RsloraSpec,
    v: dict[str, np.ndarray],
    bases: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> Path:
    """Write ``rslora_config.json`` + ``rslora_model.safetensors`` into ``out_dir``.

    Args:
        out_dir: target directory (created if needed).
        spec: the checkpoint's settings.
        v: tensors named as in spec 4.2 (``{module}.rslora_v_A`` ...), each of length k; with
            ``spec.dora`` also ``{module}.rslora_magnitude`` (d_out) per module, in ``dtype_v``.
        bases: P~ per key, required for generator "external"; for RSG-1 in stored mode they
            are regenerated when not given.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if spec.generator == "external" and bases is None:
        raise ValueError("generator 'external' needs the bases to store")
    if spec.storage == "stored" and bases is None:
        bases = {key: basis(spec, key, *shape) for key, shape in spec.pkeys().items()}
    cfg = config_dict(spec, bases)
    raw = (json.dumps(cfg, indent=2, sort_keys=False) + "\n").encode("utf-8")
    parse_config(raw)  # refuse to write what the reader would reject
    tensors = {
        name: np.ascontiguousarray(arr, dtype=_NP_DTYPE[spec.dtype_v]) for name, arr in v.items()
    }
    _check_magnitudes(spec, tensors)
    if spec.storage == "stored" and bases is not None:
        for pkey, (p_a, p_b) in bases.items():
            name_a, name_b = stored_p_names(spec.sharing, pkey)
            tensors[name_a] = np.ascontiguousarray(p_a, dtype=np.float32)
            tensors[name_b] = np.ascontiguousarray(p_b, dtype=np.float32)
    (out_dir / CONFIG_NAME).write_bytes(raw)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config_sha256": hashlib.sha256(raw).hexdigest(),
    }
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata=metadata)
    return out_dir
