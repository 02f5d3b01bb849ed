"""The onnxruntime-genai exporter's ``[export]`` options (pydantic only; choices: docs/export.md).

These are layout choices of the model builder's graph: MatMulNBits accuracy level, the lm_head's
precision, the logits output, how protected modules ship. :mod:`.layout` resolves ``auto``
against the profile's target.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rslora_deploy.exporters.options import ExportConfig

LmHeadPrecision = Literal["auto", "fp32", "fp16", "int8", "int4"]
ProtectedLayout = Literal["auto", "nbits8", "float"]


class GenaiExportConfig(ExportConfig):
    """ONNX export through the onnxruntime-genai model builder (choices: docs/export.md)."""

    accuracy_level: int | None = Field(
        default=None,
        description="MatMulNBits accuracy level. None: 4 on CPU targets (int8 activations "
        "inside MatMulNBits, the fast kernel), 1 on CUDA targets (fp32 accumulation; the CUDA "
        "kernel ignores it). 1 on CPU keeps fp32 activations (docs/export.md).",
    )
    lm_head: LmHeadPrecision = Field(
        default="auto",
        description="lm_head (and a tied embedding) precision: int4 (RTN per block of "
        "lm_head_block_size, one table shared with the embedding when tied), int8 (RTN per "
        "block; the embedding stays full precision), fp32 (CPU targets) or fp16 (CUDA "
        "targets). auto: int4 on CPU targets (1.05x the builder's decode, 0.91x its "
        "perplexity, 0.93x its size on SmolLM2; 1.07x, 0.80x, 0.98x on Gemma-3-270M; fp32 "
        "scores better but decodes at 0.42x / 0.30x), fp16 on CUDA targets (docs/export.md).",
    )
    lm_head_block_size: int = Field(
        default=32,
        description="Block size of a quantized lm_head/embedding (must divide the hidden size).",
    )
    lm_head_sym: bool = Field(
        default=True,
        description="Symmetric grid for a quantized lm_head/embedding (no zero points).",
    )
    lm_head_int4: bool = Field(
        default=False,
        description="Deprecated spelling of lm_head = int4 (kept for recipes written before it).",
    )
    last_token_logits: bool = Field(
        default=True,
        description="Ship a graph whose prefill returns the last position's logits only "
        "(builder prune_lm_head): the logits buffer is vocab x io_bytes instead of "
        "max_length x vocab x io_bytes. Evaluation reads full logits from an unshipped view.",
    )
    protected_layout: ProtectedLayout = Field(
        default="auto",
        description="How --protect-adapter's 8-bit modules ship: nbits8 (MatMulNBits bits=8, 1 "
        "byte a weight), float (exact dequantized MatMul, 4 bytes a weight in an fp32 graph), "
        "or auto: float on CPU-target graphs below accuracy_level 4, where onnxruntime's 8-bit "
        "kernel is 4.4x slower end to end (benchmarks/bench_decode.py), else nbits8.",
    )

    @field_validator("accuracy_level")
    @classmethod
    def _check_level(cls, value: int | None) -> int | None:
        if value is not None and value not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0-4, got {value}")
        return value

    @field_validator("lm_head_block_size")
    @classmethod
    def _check_block(cls, value: int) -> int:
        if value < 16 or value & (value - 1):
            raise ValueError(f"lm_head_block_size must be a power of two >= 16, got {value}")
        return value

    @model_validator(mode="after")
    def _legacy_int4(self) -> GenaiExportConfig:
        if self.lm_head_int4 and self.lm_head == "auto":
            object.__setattr__(self, "lm_head", "int4")
        return self
