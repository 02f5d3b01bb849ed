"""Import PEFT VeRA adapters into :class:`ModuleDelta` (spec 6.2).

VeRA (Kopiczko et al. 2024, arXiv 2310.11454): dW = diag(lambda_b) B diag(lambda_d) A with frozen
random A (r x max_in), B (max_out x r) shared by all layers, each layer using A[:, :d_in] and
B[:d_out, :]. So B_eff = diag(lambda_b) B[:d_out], A_eff = diag(lambda_d) A[:, :d_in], s = 1.

Checkpoints saved with ``save_projection=False`` hold no A/B. Regenerating them needs torch's CPU
generator, which is not guaranteed stable across torch versions (spec 2.9), so it is refused (E071)
unless the caller opts in, and then the regenerated hashes are logged for comparison.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from rslora_deploy.adapters import peft_common
from rslora_deploy.adapters.base import AdapterContents, AdapterLoadOptions
from rslora_deploy.adapters.delta import ModuleDelta, TensorOverride
from rslora_deploy.adapters.peft_common import (
    PREFIX,
    read_config,
    read_weights,
    reject_unsupported,
    split_overrides,
    stored_dtypes,
)
from rslora_deploy.adapters.rsg import tensor_sha256
from rslora_deploy.adapters.st_io import SafetensorsFile
from rslora_deploy.errors import AdapterFormatError, NonFiniteError, ShapeMismatchError

logger = logging.getLogger(__name__)
_SHARED = {"base_model.vera_A": "A", "base_model.vera_B": "B"}


def regenerate_projections(key: int, r: int, max_in: int, max_out: int) -> tuple[np.ndarray, ...]:
    """PEFT's seed-only projections: one CPU generator, A ~ U(+-sqrt(6/max_in)), B ~ U(+-sqrt(6/r)).

    B is drawn from the same generator after A, so it depends on max_in (spec 6.2 steps 1-4).
    """
    import torch

    gen = torch.Generator(device="cpu").manual_seed(int(key))
    bound_a = math.sqrt(6.0 / max_in)
    vera_a = torch.empty(r, max_in).uniform_(-bound_a, bound_a, generator=gen)
    bound_b = math.sqrt(6.0 / r)
    vera_b = torch.empty(max_out, r).uniform_(-bound_b, bound_b, generator=gen)
    return vera_a.numpy(), vera_b.numpy()


def load_peft_vera(
    directory: Path,
    *,
    allow_unverified_regeneration: bool = False,
    base_shapes: dict[str, tuple[int, int]] | None = None,
    allow_full_module_overrides: bool = False,
) -> tuple[list[ModuleDelta], dict[str, Any], list[TensorOverride]]:
    """Read a PEFT VeRA directory.

    Args:
        directory: adapter directory.
        allow_unverified_regeneration: regenerate missing vera_A/vera_B (E071 otherwise).
        base_shapes: module -> (d_out, d_in) of the base layers; needed only to regenerate.
        allow_full_module_overrides: accept ``modules_to_save`` / ``trainable_token_indices``
            (spec 6.1 rejections apply to VeRA too; E070 otherwise).

    Returns:
        (deltas, summary, overrides).

    Raises:
        AdapterFormatError: E023 (tensor set), E071 (projections absent and not regenerable).
        ShapeMismatchError: a lambda or a projection without rank r, or d_out > max_out.
        NonFiniteError: a lambda holds NaN/Inf.
    """
    directory = Path(directory)
    cfg = read_config(directory)
    reject_unsupported(cfg, directory / "adapter_config.json", allow_full_module_overrides)
    tensors, path = read_weights(directory)
    tensors, overrides = split_overrides(cfg, tensors, stored_dtypes(path), path)
    shared, lambdas = _split_tensors(tensors, path)
    r = int(cfg.get("r", 256))
    _check_lambdas(lambdas, r, path)
    regenerated = False
    if set(shared) != {"A", "B"}:
        if shared:
            raise AdapterFormatError(
                f"{path}: only one of base_model.vera_A/vera_B is present", code="E023"
            )
        shared = _regenerate(cfg, lambdas, r, path, allow_unverified_regeneration, base_shapes)
        regenerated = True
    vera_a, vera_b = shared["A"], shared["B"]
    if vera_a.ndim != 2 or vera_b.ndim != 2 or vera_a.shape[0] != r or vera_b.shape[1] != r:
        raise ShapeMismatchError(
            f"{path}: vera_A {list(vera_a.shape)} / vera_B "
            f"{list(vera_b.shape)} do not have rank r={r}"
        )
    layout = "conv1d" if bool(cfg.get("fan_in_fan_out", False)) else None
    deltas = [
        _module_delta(module, pair, vera_a, vera_b, r, layout, path)
        for module, pair in lambdas.items()
    ]
    summary: dict[str, Any] = {
        "r": r,
        "save_projection": not regenerated,
        "regenerated_projections": regenerated,
        "projection_prng_key": cfg.get("projection_prng_key", 0),
        "trainable_parameters": int(sum(p["b"].size + p["d"].size for p in lambdas.values())),
        "weights_file": path.name,
    }
    if regenerated:
        summary["regenerated_sha256"] = {f: tensor_sha256(shared[f]) for f in ("A", "B")}
    return deltas, summary, overrides


def _split_tensors(
    tensors: dict[str, np.ndarray], path: Path
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """Sort the file's tensors into the shared projections and the per-module lambdas.

    Returns:
        ({"A": vera_A, "B": vera_B} as far as present, {module: {"b": lambda_b, "d": lambda_d}}).

    Raises:
        AdapterFormatError: E023 for any other tensor, or when no lambda is present.
    """
    shared: dict[str, np.ndarray] = {}
    lambdas: dict[str, dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        if key in _SHARED:
            shared[_SHARED[key]] = array
            continue
        if key.startswith(PREFIX):
            module, _, leaf = key[len(PREFIX) :].rpartition(".")
            if leaf in ("vera_lambda_b", "vera_lambda_d"):
                lambdas.setdefault(module, {})[leaf[-1]] = array
                continue
        raise AdapterFormatError(
            f"{path}: unexpected tensor {key!r} in a VeRA adapter", code="E023"
        )
    if not lambdas:
        raise AdapterFormatError(f"{path} holds no vera_lambda tensors", code="E023")
    return shared, lambdas


def _check_lambdas(lambdas: dict[str, dict[str, np.ndarray]], r: int, path: Path) -> None:
    """Every module has finite lambda_b and lambda_d, and lambda_d has r entries."""
    for module, pair in lambdas.items():
        for leaf in ("b", "d"):
            if leaf not in pair:
                raise AdapterFormatError(
                    f"{path}: missing tensor {module}.vera_lambda_{leaf}", code="E023"
                )
            if not np.all(np.isfinite(pair[leaf])):
                raise NonFiniteError(f"{path}: {module}.vera_lambda_{leaf} contains NaN/Inf")
        if pair["d"].shape != (r,):
            raise ShapeMismatchError(
                f"{path}: {module}.vera_lambda_d has shape "
                f"{list(pair['d'].shape)}, expected [{r}] (r)"
            )


def _module_delta(
    module: str,
    pair: dict[str, np.ndarray],
    vera_a: np.ndarray,
    vera_b: np.ndarray,
    r: int,
    layout: str | None,
    path: Path,
) -> ModuleDelta:
    """B_eff = diag(lambda_b) B[:d_out], A_eff = diag(lambda_d) A, s = 1 for one module.

    A keeps all max_in columns: the merge slices A[:, :d_in] once it knows the layer
    (``slice_in_from_layer``).
    """
    d_out = int(pair["b"].shape[0])
    if d_out > vera_b.shape[0]:
        raise ShapeMismatchError(
            f"{path}: {module} has d_out={d_out} > max_out={vera_b.shape[0]} rows of vera_B"
        )
    return ModuleDelta(
        name=module,
        layout=layout,
        d_in=int(vera_a.shape[1]),
        d_out=d_out,
        B=pair["b"][:, None].astype(np.float32) * vera_b[:d_out, :],
        A=pair["d"][:, None].astype(np.float32) * vera_a,
        scale=1.0,
        source={"format": "peft-vera", "r": r, "slice_in_from_layer": True},
    )


def _regenerate(
    cfg: dict[str, Any],
    lambdas: dict[str, dict[str, np.ndarray]],
    r: int,
    path: Path,
    allowed: bool,
    base_shapes: dict[str, tuple[int, int]] | None,
) -> dict[str, np.ndarray]:
    if not allowed:
        raise AdapterFormatError(
            f"{path}: VeRA adapter saved with save_projection=False has no vera_A/vera_B; "
            "regenerating them from projection_prng_key is not reproducible across torch versions. "
            "Re-save with save_projection=True, or opt in with allow_unverified_vera_regeneration",
            code="E071",
        )
    if base_shapes is None:
        raise AdapterFormatError(
            f"{path}: regenerating VeRA projections needs the base model's layer shapes; load it "
            "through the merge stage",
            code="E071",
        )
    missing = sorted(set(lambdas) - set(base_shapes))
    if missing:
        raise AdapterFormatError(
            f"{path}: VeRA module {missing[0]} is not in the base model", code="E020"
        )
    max_out = max(base_shapes[m][0] for m in lambdas)
    max_in = max(base_shapes[m][1] for m in lambdas)
    vera_a, vera_b = regenerate_projections(
        int(cfg.get("projection_prng_key", 0)), r, max_in, max_out
    )
    logger.warning(
        "VeRA projections regenerated from projection_prng_key=%s with torch %s: sha256(vera_A)=%s "
        "sha256(vera_B)=%s; compare them on the training machine, nothing here can verify them",
        cfg.get("projection_prng_key", 0),
        __import__("torch").__version__,
        tensor_sha256(vera_a),
        tensor_sha256(vera_b),
    )
    return {"A": vera_a, "B": vera_b}


class PeftVeraFormat:
    """PEFT VeRA (``adapter_config.json`` with ``peft_type`` VERA; spec 6.2)."""

    name: ClassVar[str] = "peft-vera"

    def claims(self, directory: Path, names: frozenset[str]) -> bool:
        """A PEFT config whose ``peft_type`` is VERA."""
        return peft_common.peft_type(directory, names) == "VERA"

    def load(self, directory: Path, options: AdapterLoadOptions) -> AdapterContents:
        """Read the VeRA vectors and shared projections (regenerated only when allowed)."""
        deltas, summary, overrides = load_peft_vera(
            directory,
            allow_unverified_regeneration=options.allow_unverified_vera_regeneration,
            base_shapes=options.base_shapes,
            allow_full_module_overrides=options.allow_full_module_overrides,
        )
        summary = {**summary, "checksums": "none recorded by the format"}
        return AdapterContents(deltas, summary, None, overrides)

    def base_shapes_needed(self, directory: Path) -> list[str]:
        """Modules whose base shapes regeneration needs: all of them without saved projections.

        With ``save_projection=False`` the shared projections must be regenerated from the base
        layer shapes; with saved projections nothing is needed.
        """
        st_path = directory / peft_common.SAFETENSORS_NAME
        if not st_path.is_file():
            return []
        keys = set(SafetensorsFile(st_path).keys())
        if "base_model.vera_A" in keys:
            return []
        prefix = peft_common.PREFIX
        return sorted(
            {
                k[len(prefix) :].rpartition(".")[0]
                for k in keys
                if k.startswith(prefix) and k.endswith(".vera_lambda_b")
            }
        )
