"""Import PEFT LoRA adapters into :class:`ModuleDelta` (spec 6.1).

LoRA (Hu et al. 2021, arXiv 2106.09685): dW = s * B A with s = alpha/r; rank-stabilized LoRA
(Kalajdzievski 2023, arXiv 2312.03732, PEFT ``use_rslora``): s = alpha/sqrt(r). Per-module r and
alpha come from ``rank_pattern``/``alpha_pattern``. Embedding adapters (``lora_embedding_A/B``) use
the embedding layout, ``fan_in_fan_out`` the conv1d layout. ``modules_to_save`` and trainable-token
tensors are returned as overrides only with ``allow_full_module_overrides`` (E070 otherwise).

DoRA (Liu et al. 2024, arXiv 2402.09353, PEFT ``use_dora``): each module also saves
``lora_magnitude_vector`` m (d_out,), carried on the delta; the merge applies
W' = (m / ||W + dW||_row) * (W + dW) (:mod:`rslora_deploy.adapters.merge_math`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from rslora_deploy.adapters import peft_common
from rslora_deploy.adapters.base import AdapterContents, AdapterLoadOptions
from rslora_deploy.adapters.delta import ModuleDelta, TensorOverride
from rslora_deploy.adapters.peft_common import (
    pattern_value,
    read_config,
    read_weights,
    reject_unsupported,
    split_overrides,
    stored_dtypes,
    strip_prefix,
)
from rslora_deploy.errors import (
    AdapterFormatError,
    NonFiniteError,
    ShapeMismatchError,
)

_SUFFIXES = {
    ".lora_magnitude_vector": ("M", False),
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """alpha/sqrt(r) for rank-stabilized LoRA, else alpha/r."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _split_key(module_key: str, path: Path) -> tuple[str, str, bool]:
    for suffix, (factor, embedding) in _SUFFIXES.items():
        if module_key.endswith(suffix):
            return module_key[: -len(suffix)], factor, embedding
    raise AdapterFormatError(
        f"{path}: unexpected tensor {module_key!r} in a LoRA adapter "
        "(expected *.lora_A.weight / *.lora_B.weight)",
        code="E023",
    )


def load_peft_lora(
    directory: Path, *, allow_full_module_overrides: bool = False
) -> tuple[list[ModuleDelta], dict[str, Any], list[TensorOverride]]:
    """Read a PEFT LoRA directory.

    Args:
        directory: adapter directory.
        allow_full_module_overrides: accept ``modules_to_save`` / ``trainable_token_indices``
            and return their tensors as overrides (spec 6.1 rejections; E070 otherwise).

    Returns:
        (deltas, summary, overrides); summary has r, alpha, use_rslora, trainable parameters.

    Raises:
        UnsupportedError: E070 for lora_bias, modules_to_save and the other rejections.
        AdapterFormatError: E023 (tensor set), ShapeMismatchError: E022, NonFiniteError: E030.
    """
    directory = Path(directory)
    cfg = read_config(directory)
    reject_unsupported(
        cfg, directory / "adapter_config.json", allow_full_module_overrides, allow_dora=True
    )
    all_tensors, path = read_weights(directory)
    tensors, overrides = split_overrides(cfg, all_tensors, stored_dtypes(path), path)
    groups, embedding_modules, saved_bases = _group_factors(tensors, path)
    deltas = []
    for module, factors in groups.items():
        delta = _module_delta(module, factors, cfg, path, embedding=module in embedding_modules)
        if module in saved_bases:
            delta.expected_base = saved_bases.pop(module)
        deltas.append(delta)
    if saved_bases:
        raise AdapterFormatError(
            f"{path}: unexpected tensor {next(iter(saved_bases))}"
            ".base_layer.weight without LoRA factors",
            code="E023",
        )
    if not deltas:
        raise AdapterFormatError(f"{path} holds no LoRA tensors", code="E023")
    summary = {
        "r": int(cfg.get("r", 8)),
        "lora_alpha": float(cfg.get("lora_alpha", 8)),
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "trainable_parameters": int(sum(t.size for t in all_tensors.values())),
        "weights_file": path.name,
    }
    return deltas, summary, overrides


def _group_factors(
    tensors: dict[str, np.ndarray], path: Path
) -> tuple[dict[str, dict[str, np.ndarray]], set[str], dict[str, np.ndarray]]:
    """Group the LoRA tensors by module.

    Returns:
        ({module: {"A": lora_A, "B": lora_B}}, the modules stored in the embedding layout,
        {module: saved base weight}).
    """
    groups: dict[str, dict[str, np.ndarray]] = {}
    embedding_modules: set[str] = set()
    saved_bases: dict[str, np.ndarray] = {}
    for key, array in tensors.items():
        stripped = strip_prefix(key, path)
        if stripped.endswith(".base_layer.weight"):
            # PEFT's save_embedding_layers="auto" stores the whole embedding next to its LoRA
            # factors; it must equal the base's weight, which the merge checks (E010).
            saved_bases[stripped.removesuffix(".base_layer.weight")] = array
            continue
        module, factor, embedding = _split_key(stripped, path)
        groups.setdefault(module, {})[factor] = array
        if embedding and factor != "M":
            embedding_modules.add(module)
    return groups, embedding_modules, saved_bases


def _module_delta(
    module: str, factors: dict[str, np.ndarray], cfg: dict[str, Any], path: Path, *, embedding: bool
) -> ModuleDelta:
    """Check one module's factors and build its delta with its own r/alpha from the patterns.

    Raises:
        AdapterFormatError: E023 when lora_A or lora_B is missing.
        ShapeMismatchError: when the factors do not have the module's rank.
        NonFiniteError: when a factor holds NaN/Inf.
    """
    for factor in ("A", "B"):
        if factor not in factors:
            raise AdapterFormatError(
                f"{path}: missing tensor for {module} factor {factor} (lora_{factor})",
                code="E023",
            )
    a_mat, b_mat = factors["A"], factors["B"]
    r_m = int(pattern_value(cfg.get("rank_pattern"), module, int(cfg.get("r", 8))))
    alpha_m = float(
        pattern_value(cfg.get("alpha_pattern"), module, float(cfg.get("lora_alpha", 8)))
    )
    if a_mat.ndim != 2 or b_mat.ndim != 2 or a_mat.shape[0] != r_m or b_mat.shape[1] != r_m:
        raise ShapeMismatchError(
            f"{path}: {module} has lora_A {list(a_mat.shape)} and lora_B "
            f"{list(b_mat.shape)}, expected rank r={r_m} (A [r, d_in], B [d_out, r]) from "
            "r/rank_pattern in adapter_config.json"
        )
    for factor, array in (("A", a_mat), ("B", b_mat)):
        if not np.all(np.isfinite(array)):
            raise NonFiniteError(f"{path}: {module} lora_{factor} contains NaN/Inf")
    use_rslora = bool(cfg.get("use_rslora", False))
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    magnitude = _magnitude(module, factors.get("M"), bool(cfg.get("use_dora")), path)
    return ModuleDelta(
        name=module,
        layout="embedding" if embedding else ("conv1d" if fan_in_fan_out else None),
        d_in=int(a_mat.shape[1]),
        d_out=int(b_mat.shape[0]),
        B=b_mat,
        A=a_mat,
        scale=lora_scale(alpha_m, r_m, use_rslora),
        source={
            "format": "peft-lora",
            "r": r_m,
            "alpha": alpha_m,
            "use_rslora": use_rslora,
            **({"dora": True} if magnitude is not None else {}),
        },
        magnitude=magnitude,
    )


def _magnitude(
    module: str, vector: np.ndarray | None, use_dora: bool, path: Path
) -> np.ndarray | None:
    """The module's DoRA magnitude, present exactly when the config says ``use_dora``.

    Raises:
        AdapterFormatError: E023 for a magnitude without use_dora or use_dora without one (the
            merge would silently be plain LoRA, or silently drop the trained magnitude).
    """
    if vector is None and use_dora:
        raise AdapterFormatError(
            f"{path}: {module} has no lora_magnitude_vector but adapter_config.json says "
            "use_dora=true; the adapter file is incomplete",
            code="E023",
        )
    if vector is not None and not use_dora:
        raise AdapterFormatError(
            f"{path}: {module}.lora_magnitude_vector is a DoRA tensor but adapter_config.json "
            "says use_dora=false; fix the config (set use_dora) or remove the tensor",
            code="E023",
        )
    return None if vector is None else np.asarray(vector, dtype=np.float32)


class PeftLoraFormat:
    """PEFT LoRA (``adapter_config.json`` with ``peft_type`` LORA; spec 6.1)."""

    name: ClassVar[str] = "peft-lora"

    def claims(self, directory: Path, names: frozenset[str]) -> bool:
        """A PEFT config whose ``peft_type`` is LORA."""
        return peft_common.peft_type(directory, names) == "LORA"

    def load(self, directory: Path, options: AdapterLoadOptions) -> AdapterContents:
        """Read the LoRA factors (rsLoRA scaling included) into ModuleDeltas."""
        deltas, summary, overrides = load_peft_lora(
            directory, allow_full_module_overrides=options.allow_full_module_overrides
        )
        summary = {**summary, "checksums": "none recorded by the format"}
        return AdapterContents(deltas, summary, None, overrides)

    def base_shapes_needed(self, directory: Path) -> list[str]:
        """LoRA stores both factors: no base shapes needed."""
        return []
