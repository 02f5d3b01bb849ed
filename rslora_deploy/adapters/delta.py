"""The one internal representation every adapter importer produces (spec section 5.1).

Per target module: ``ModuleDelta(name, layout, d_in, d_out, out_slice, factored(B_eff, A_eff, s) |
dense(dW))`` with logical shapes A_eff in R^{rho x d_in}, B_eff in R^{d_out x rho} and

    dW = s * B_eff @ A_eff  in R^{d_out x d_in}

(LoRA, Hu et al. 2021, arXiv 2106.09685: W' = W + (alpha/r) B A). A DoRA delta (Liu et al. 2024,
arXiv 2402.09353) also carries the trained magnitude m in R^{d_out}; its merge re-normalises each
logical output row:

    W' = (m / n) * (W + dW),   n_i = ||(W + dW)[i, :]||_2   (one norm per output row)

Only the final add depends on the
storage layout (linear: W[d_out, d_in]; conv1d and embedding: stored transposed). The merge and the
on-the-fly module both consume these same factors, which is what makes merged == on-the-fly a
meaningful test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

LAYOUTS = ("linear", "conv1d", "embedding")


@dataclass
class ModuleDelta:
    """The update of one weight.

    Attributes:
        name: module path in the base model (no ``base_model.model.`` prefix, no ``.weight``).
        layout: ``linear``, ``conv1d``, ``embedding``, or ``None`` when the importer does not know
            it and the layer's type decides (PEFT LoRA without ``fan_in_fan_out``).
        d_in: logical input width (num_embeddings for an embedding).
        d_out: logical output width (the slice width when ``out_slice`` is set).
        out_slice: ``(start, stop)`` on the logical out dimension of a fused weight, or None.
        B: factor B_eff (d_out, rho), float64 or float32; None for a dense delta.
        A: factor A_eff (rho, d_in); None for a dense delta.
        scale: the scalar s multiplying B @ A.
        dense: the full dW (d_out, d_in) for importers without factors; None when factored.
        source: free-form facts for reports (format, r, alpha...).
        expected_base: a copy of the base weight the adapter file carries (PEFT saves whole
            embeddings); the merge checks it equals the base's weight.
        recorded_name: the name in the adapter file when a user rename map changed ``name``
            (spec 5.2 step 1); None otherwise. Projection keys always use the recorded name.
        magnitude: DoRA's magnitude vector m (d_out,) (PEFT ``lora_magnitude_vector``); None for
            a plain additive delta.
    """

    name: str
    layout: str | None
    d_in: int
    d_out: int
    out_slice: tuple[int, int] | None = None
    B: np.ndarray | None = None
    A: np.ndarray | None = None
    scale: float = 1.0
    dense: np.ndarray | None = None
    source: dict[str, Any] = field(default_factory=dict)
    expected_base: np.ndarray | None = None
    recorded_name: str | None = None
    magnitude: np.ndarray | None = None

    @property
    def kind(self) -> str:
        """``factored`` or ``dense``."""
        return "dense" if self.dense is not None else "factored"

    @property
    def rank(self) -> int | None:
        """rho, the inner dimension of the factors (None for a dense delta)."""
        return None if self.A is None else int(self.A.shape[0])

    def delta_weight(self, dtype: type[np.floating[Any]] = np.float64) -> np.ndarray:
        """The update dW = s * B_eff @ A_eff in the logical (d_out, d_in) orientation.

        Computed in float64 (spec 5.2 step 5 allows fp64 on CPU) so the result does not depend on
        the BLAS used; callers round it once to float32 before adding it to the fp32 weight.
        """
        if self.dense is not None:
            return np.asarray(self.dense, dtype=dtype)
        assert self.A is not None
        assert self.B is not None
        product = np.asarray(self.B, dtype=np.float64) @ np.asarray(self.A, dtype=np.float64)
        product *= float(self.scale)
        return product.astype(dtype, copy=False)

    def fit_to_layer(self, d_out: int, d_in: int) -> None:
        """Resolve a width the importer could not know (VeRA slices the shared vera_A).

        PEFT VeRA stores one vera_A of shape (r, max_in) for all layers and each layer uses
        vera_A[:, :d_in]; only the base layer tells d_in, so the slice happens here.
        """
        from rslora_deploy.errors import ShapeMismatchError

        if not self.source.get("slice_in_from_layer") or self.A is None:
            return
        if self.A.shape[1] < d_in:
            raise ShapeMismatchError(
                f"{self.name}: shared vera_A has {self.A.shape[1]} columns but the layer has "
                f"d_in={d_in}; max_in must be >= every target's d_in (spec 6.2)"
            )
        self.A = self.A[:, :d_in]
        self.d_in = d_in
        self.source["slice_in_from_layer"] = False

    def check_shapes(self) -> None:
        """Raise E022 when the factors (or a DoRA magnitude) disagree with (d_out, d_in)."""
        from rslora_deploy.errors import ShapeMismatchError

        if self.magnitude is not None:
            self._check_magnitude()

        if self.dense is not None:
            if tuple(self.dense.shape) != (self.d_out, self.d_in):
                raise ShapeMismatchError(
                    f"{self.name}: dense delta has shape {tuple(self.dense.shape)}, expected "
                    f"({self.d_out}, {self.d_in}) from the module entry; fix the adapter file"
                )
            return
        if self.A is None or self.B is None:
            raise ShapeMismatchError(f"{self.name}: delta has neither factors nor a dense dW")
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ShapeMismatchError(
                f"{self.name}: factor shapes B{tuple(self.B.shape)} and A{tuple(self.A.shape)} do "
                "not chain (expected B (d_out, r) and A (r, d_in)); fix the adapter file"
            )
        if (self.B.shape[0], self.A.shape[1]) != (self.d_out, self.d_in):
            raise ShapeMismatchError(
                f"{self.name}: factors give dW of shape ({self.B.shape[0]}, {self.A.shape[1]}), "
                f"expected (d_out={self.d_out}, d_in={self.d_in}); fix the adapter file"
            )

    def _check_magnitude(self) -> None:
        from rslora_deploy.errors import NonFiniteError, ShapeMismatchError

        m = np.asarray(self.magnitude)
        if m.shape != (self.d_out,):
            raise ShapeMismatchError(
                f"{self.name}.lora_magnitude_vector has shape {list(m.shape)}, expected "
                f"[{self.d_out}] (one entry per output row of the layer); fix the adapter file"
            )
        if not np.all(np.isfinite(m)):
            raise NonFiniteError(
                f"{self.name}.lora_magnitude_vector contains NaN/Inf; the DoRA adapter is corrupted"
            )
        if np.any(m == 0):
            raise ShapeMismatchError(
                f"{self.name}.lora_magnitude_vector has {int(np.sum(m == 0))} zero entries; a "
                "trained DoRA magnitude is a row norm, never 0: the adapter file is damaged"
            )


def trainable_count(deltas: list[ModuleDelta]) -> int:
    """Sum of the factor sizes (informational; importers report their own true counts)."""
    total = 0
    for delta in deltas:
        if delta.dense is not None:
            total += int(delta.dense.size)
        elif delta.A is not None and delta.B is not None:
            total += int(delta.A.size + delta.B.size)
    return total


@dataclass
class TensorOverride:
    """A base tensor replaced by one a PEFT adapter saved (spec 6.1, full module overrides).

    ``modules_to_save`` copies the whole tensor; ``trainable_token_indices`` replaces the listed
    rows of an embedding (PEFT stores the new rows, not a difference, and merges with
    ``index_copy``). Neither is a factored update, so they bypass :class:`ModuleDelta`.

    Attributes:
        name: path of the module owning the tensor (renamable like ``ModuleDelta.name``).
        param: the tensor's name inside that module (``weight``, ``bias``...).
        value: the saved values as float32 (an exact widening of ``stored_dtype``).
        stored_dtype: safetensors dtype string as saved (``F32``, ``BF16``, ``F16``...); it must
            equal the base tensor's dtype.
        kind: ``modules_to_save`` or ``trainable_tokens``.
        rows: for trainable tokens, the replaced row indices (``value`` has one row each).
        recorded_name: the adapter's module name when a rename map changed ``name``.
    """

    name: str
    param: str
    value: np.ndarray
    stored_dtype: str
    kind: str
    rows: tuple[int, ...] | None = None
    recorded_name: str | None = None

    @property
    def target(self) -> str:
        """``{name}.{param}``, the base state-dict key this replaces."""
        return f"{self.name}.{self.param}"
