"""The quantizer handler contract and the method-specific options beside ``QuantizeConfig``.

A handler is registered in :data:`rslora_deploy.quantizers.QUANTIZERS` under its method name and
turns a full-precision Hugging Face directory into a GPTQ- or AWQ-format checkpoint directory.
The stage (:mod:`rslora_deploy.stages.quantize`) validates inputs, prepares calibration data and
writes the artifact meta; handlers only run their algorithm and save.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from rslora_deploy.config import QuantizeConfig
    from rslora_deploy.data.calibration import CalibrationSet


class QuantizeExtras(BaseModel):
    """Engine options that are not part of the recipe's ``[quantize]`` section.

    Used by benchmarks (to measure what each setting buys) and by ``--protect-adapter``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    true_sequential: bool = Field(
        default=True, description="GPTQ: quantize q/k/v, o, up/gate, down in sequence."
    )
    offload_to_disk: bool | None = Field(
        default=None,
        description="gptqmodel's offload of finished layers to a temporary directory (None: "
        "its default, on).",
    )
    act_group_aware: bool | None = Field(
        default=None, description="gptqmodel's group-aware act-order (None: its default)."
    )
    dynamic: dict[str, dict[str, Any]] | None = Field(
        default=None,
        description="Per-module overrides in gptqmodel's format: regex -> {bits, group_size}; "
        "written into quantization_config.dynamic (see survival.protect_modules).",
    )


class Quantizer(Protocol):
    """One quantization method.

    Attributes:
        name: registry name (``gptq``, ``awq``, ``rtn``).
        needs_calibration: whether :meth:`quantize` needs a :class:`CalibrationSet`.
        supported_bits: bit widths the method can write.
        unsupported_model_types: ``model_type -> reason`` the stage refuses before loading the
            model (empty: every architecture with decoder ``nn.Linear`` layers); part of the
            protocol so the stage reads it instead of probing for it.
    """

    name: ClassVar[str]
    needs_calibration: ClassVar[bool]
    supported_bits: ClassVar[tuple[int, ...]]
    packs_output_features: ClassVar[bool]
    """True when codes are packed along the output dimension (AWQ GEMM), False along the input
    (GPTQ): the packed width must be a multiple of the values per int32."""
    compute_dtypes: ClassVar[tuple[str, ...]]
    """The ``compute_dtype`` values the method runs in."""
    unsupported_model_types: ClassVar[Mapping[str, str]]

    def quantize(
        self,
        model_dir: Path,
        out_dir: Path,
        cfg: QuantizeConfig,
        calib: CalibrationSet | None,
        extras: QuantizeExtras,
    ) -> dict[str, Any]:
        """Quantize ``model_dir`` into ``out_dir`` (existing, empty); return method facts."""
        ...
