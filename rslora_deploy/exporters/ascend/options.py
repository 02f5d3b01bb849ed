"""The ascend-om exporter's ``[export]`` options (pydantic only).

A static-shape graph is sized by two numbers: the KV buffer (``max_length``, from the base) and
the gears, the new-token counts per call it is compiled for. Whether the gears fit the buffer
depends on the profile when ``max_length`` is unset, so that check is the exporter's
``check_config`` (:func:`.exporter.check_gears`), run before any work.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from rslora_deploy.exporters.options import ExportConfig

#: What an empty recipe compiles: decode, then prefill chunks of 16, 64 and 256 tokens.
DEFAULT_GEARS = (1, 16, 64, 256)


class AscendExportConfig(ExportConfig):
    """Static fp16 ONNX for ATC: the KV length (``max_length``) and the compiled gears."""

    gears: tuple[int, ...] = Field(
        default=DEFAULT_GEARS,
        description="The values of S (new tokens per call) the static graph is compiled for; "
        "1 is decode, the rest prefill chunks. Each must be <= max_length (the profile's "
        "max_seq_len when unset).",
    )

    @field_validator("gears")
    @classmethod
    def _check_gears(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        # A static graph is compiled once per gear; the runner picks the smallest that holds a
        # chunk, so the list is the compile plan as written: 1 (decode) first, then increasing.
        if not value or value[0] != 1 or any(g < 1 for g in value):
            raise ValueError(
                f"gears must be positive, start with 1 (decode) and be non-empty, got {list(value)}"
            )
        if any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError(
                f"gears must be strictly increasing, got {list(value)}; write e.g. [1, 16, 64]"
            )
        return value
