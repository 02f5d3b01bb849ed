"""On-the-fly adapter modules: apply an update without merging it into the weight.

For a base layer y = x W^T + b (any storage layout) and factors A (rho x d_in), B (d_out x rho):

    y' = base(x) + s * (x A^T) B^T        (LoRA forward, Hu et al. 2021, arXiv 2106.09685)

A DoRA delta (Liu et al. 2024, arXiv 2402.09353) rescales each output row by f = m / ||W + dW||_row
(the norm of the unmerged weight, as PEFT's forward): y' = f * (x W^T + s (x A^T) B^T) + b.

``DeltaLinear`` uses fixed factors from a :class:`ModuleDelta` (the reference the merge is tested
against); ``RSLoRALinear`` builds them from trainable v and frozen P~ buffers (spec 3.2):
A~ = sum_l v_A[l] P~_A[l], B~ = sum_l v_B[l] P~_B[l]. P~ is a buffer, never in ``parameters()``,
so optimizers and trainable-parameter counts see only v (spec 1, item 9).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import nn

from rslora_deploy.adapters.delta import ModuleDelta


def _pad_to_slice(update: torch.Tensor, out_slice: tuple[int, int] | None, full: int) -> Any:
    if out_slice is None:
        return update
    start, stop = out_slice
    return F.pad(update, (start, full - stop))


class DeltaLinear(nn.Module):
    """A base Linear/Conv1D/Embedding plus a fixed low-rank update applied in forward.

    Args:
        base: the original layer (kept as ``self.base``).
        delta: factored ModuleDelta with logical shapes.
        layout: ``linear``, ``conv1d`` or ``embedding`` (the base's storage layout).
        full_out: the layer's full logical out width (for out_slice).
    """

    # Registered buffers, declared for the type checker (nn.Module.__getattr__ is typed
    # Tensor | Module); the names are PEFT's state-dict names.
    lora_A: torch.Tensor  # noqa: N815
    lora_B: torch.Tensor  # noqa: N815

    def __init__(self, base: nn.Module, delta: ModuleDelta, layout: str, full_out: int) -> None:
        super().__init__()
        if delta.A is None or delta.B is None:
            raise ValueError(f"{delta.name}: on-the-fly application needs a factored delta")
        self.base = base
        self.layout = layout
        self.scale = float(delta.scale)
        self.out_slice = delta.out_slice
        self.full_out = full_out
        self.register_buffer("lora_A", torch.from_numpy(np.asarray(delta.A, np.float32)).clone())
        self.register_buffer("lora_B", torch.from_numpy(np.asarray(delta.B, np.float32)).clone())
        self.dora_factor = (
            _dora_factor(base, delta, layout) if delta.magnitude is not None else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + s * (x A^T) B^T, added to the out_slice columns when set."""
        y = self.base(x)
        if self.layout == "embedding":
            hidden = F.embedding(x, self.lora_A.T)
        else:
            hidden = x.to(self.lora_A.dtype) @ self.lora_A.T
        update = (hidden @ self.lora_B.T) * self.scale
        padded = _pad_to_slice(update, self.out_slice, self.full_out).to(y.dtype)
        if self.dora_factor is None:
            return y + padded
        bias = getattr(self.base, "bias", None)
        core = y - bias if isinstance(bias, torch.Tensor) else y
        rows = torch.ones(self.full_out, dtype=y.dtype)
        start, stop = self.out_slice or (0, self.full_out)
        rows[start:stop] = self.dora_factor.to(y.dtype)
        scaled = (core + padded) * rows
        return scaled + bias if isinstance(bias, torch.Tensor) else scaled


def _dora_factor(base: nn.Module, delta: ModuleDelta, layout: str) -> torch.Tensor:
    """DoRA's row factor m / ||W + dW||_row over the delta's output rows (float64, then fp32)."""
    from rslora_deploy.adapters.merge_math import weight_of

    weight = weight_of(base).detach().to(torch.float64)
    logical = weight if layout == "linear" else weight.T
    start, stop = delta.out_slice or (0, delta.d_out)
    rows = logical[start:stop] + torch.from_numpy(delta.delta_weight(np.float64))
    magnitude = torch.from_numpy(np.asarray(delta.magnitude, dtype=np.float64))
    return (magnitude / torch.linalg.vector_norm(rows, dim=1)).to(torch.float32)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_on_the_fly(model: nn.Module, deltas: list[ModuleDelta]) -> nn.Module:
    """Wrap every target of ``deltas`` in a DeltaLinear (in place); returns ``model``.

    Runs the same validation as the merge (E020-E022, E050 is not relevant: nothing is written).
    """
    from rslora_deploy.adapters.merge_math import (
        check_delta_against_layer,
        layer_layout,
        logical_shape,
        resolve_module,
    )

    for delta in deltas:
        module = resolve_module(model, delta.name)
        base = module.base if isinstance(module, DeltaLinear) else module
        layout = layer_layout(base, delta.name)
        d_out, d_in = logical_shape(base, layout)
        check_delta_against_layer(delta, layout, d_out, d_in)
        _set_submodule(model, delta.name, DeltaLinear(module, delta, layout, d_out))
    return model


class RSLoRALinear(nn.Module):
    """Trainable RS-LoRA wrapper of a Linear or Conv1D layer (only v_A, v_B are parameters).

    Args:
        base: the frozen layer.
        p_a: P~_A, shape (k, r, d_in), float32.
        p_b: P~_B, shape (k, d_out, r), float32.
        scale: s = sigma * nu^2.
        v_a_init: initial v_A (length k); v_B starts at 0 so dW = 0 at step 0 (spec 3.5).
    """

    P_A: torch.Tensor
    P_B: torch.Tensor

    def __init__(
        self,
        base: nn.Module,
        p_a: torch.Tensor,
        p_b: torch.Tensor,
        scale: float,
        v_a_init: torch.Tensor,
    ) -> None:
        super().__init__()
        self.base = base
        self.scale = float(scale)
        # persistent=False: P~ is regenerated from the seed, never saved with the model.
        self.register_buffer("P_A", p_a, persistent=False)
        self.register_buffer("P_B", p_b, persistent=False)
        k = p_a.shape[0]
        self.v_A = nn.Parameter(v_a_init.to(torch.float32).clone())
        self.v_B = nn.Parameter(torch.zeros(k, dtype=torch.float32))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A~, B~) = (sum_l v_A[l] P~_A[l], sum_l v_B[l] P~_B[l])."""
        a_t = torch.einsum("l,lij->ij", self.v_A, self.P_A)
        b_t = torch.einsum("l,lij->ij", self.v_B, self.P_B)
        return a_t, b_t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + s * (x A~^T) B~^T."""
        a_t, b_t = self.factors()
        return self.base(x) + ((x @ a_t.T) @ b_t.T) * self.scale
