"""The adapter-format contract: how a directory is recognised and read into ``ModuleDelta``s.

Every format is a class registered in :data:`rslora_deploy.adapters.ADAPTER_FORMATS`. Detection
asks each registered format whether it claims a directory (from its file names, reading at most a
small config file); loading returns the deltas plus what the merge report shows. The merge path
never branches on a format's name: a format that needs the base model's layer shapes to
regenerate something (PEFT VeRA without saved projections) says so through
:meth:`AdapterFormat.base_shapes_needed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from rslora_deploy.adapters.delta import ModuleDelta, TensorOverride


@dataclass(frozen=True)
class AdapterLoadOptions:
    """The relaxations and extra inputs a caller may grant a loader.

    Attributes:
        allow_unverified_vera_regeneration: allow PEFT VeRA without saved projections (E071).
        base_shapes: module -> (d_out, d_in), for a format whose :meth:`base_shapes_needed` is
            not empty.
        allow_full_module_overrides: accept PEFT ``modules_to_save`` / ``trainable_token_indices``
            (E070 otherwise) and return their tensors as overrides.
    """

    allow_unverified_vera_regeneration: bool = False
    base_shapes: dict[str, tuple[int, int]] | None = None
    allow_full_module_overrides: bool = False


@dataclass
class AdapterContents:
    """What a format's loader read.

    Attributes:
        deltas: one ModuleDelta per target module.
        summary: JSON-ready facts for the merge report (rank, scale, checksums...).
        base_hashes: hashes of the base the adapter records (RS-LoRA v1), or None.
        overrides: full-tensor overrides (PEFT modules_to_save), when allowed.
    """

    deltas: list[ModuleDelta]
    summary: dict[str, Any]
    base_hashes: dict[str, str] | None = None
    overrides: list[TensorOverride] = field(default_factory=list)


class AdapterFormat(Protocol):
    """One adapter file format."""

    name: ClassVar[str]
    """Registry key and the ``format`` the merge report shows (``rslora-v1``, ``peft-lora``...)."""

    def claims(self, directory: Path, names: frozenset[str]) -> bool:
        """Whether ``directory`` (holding files ``names``) is in this format."""

    def load(self, directory: Path, options: AdapterLoadOptions) -> AdapterContents:
        """Read and check the adapter; raise the catalogue's errors (E001-E071) on bad input."""

    def base_shapes_needed(self, directory: Path) -> list[str]:
        """Modules whose base-layer shapes :meth:`load` needs (usually none)."""
