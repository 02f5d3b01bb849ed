"""Typed reports the stages hand to each other and write into ``reports/``.

They are pydantic models so a report's shape is checked where it is made, not where it is read,
and ``model_dump(mode="json")`` is what lands on disk. Fields a later version adds must get a
default so older packages still load.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data, as written into ``reports/`` and the manifest."""
        return self.model_dump(mode="json")


class SmokeReport(_Report):
    """A greedy generation with the shipped bytes, run in a child process (stage ``verify``)."""

    prompt: str = Field(description="The prompt.")
    text: str = Field(description="Prompt plus generated text, decoded.")
    new_tokens: int = Field(ge=0, description="Tokens generated.")
    prefill_seconds: float = Field(ge=0, description="Time to process the prompt.")
    decode_tokens_per_second: float = Field(ge=0, description="Generation speed.")
    peak_rss_bytes: int = Field(ge=0, description="Peak RSS (VmHWM) of the child process.")
    rss_before_load_bytes: int = Field(default=0, ge=0, description="RSS before the model load.")
    kv_max_length: int | None = Field(default=None, description="KV cache length, if set.")
    runtime: str = Field(description="Runtime and version that ran it.")


class MeasuredCpu(_Report):
    """The smoke run's peak RSS, with what it does and does not show for the profile."""

    peak_rss_bytes: int = Field(ge=0)
    kv_max_length: int | None = None
    comparable_to_estimate: bool
    note: str


class BudgetReport(_Report):
    """Stage ``check_budget``: every term of the memory estimate, the total and the verdict."""

    profile: str
    fits: bool
    budget_bytes: int
    estimate_bytes: int
    headroom_bytes: int
    terms_bytes: dict[str, int] = Field(description="Each term of the formula, in bytes.")
    inputs: dict[str, Any] = Field(description="The numbers the formula was evaluated with.")
    formula: str
    notes: str = ""
    weights_source: str = ""
    reserved_source: dict[str, Any] | None = Field(
        default=None, description="Where reserved_bytes comes from (measured rows or allowance)."
    )
    measured: dict[str, Any] | None = Field(
        default=None,
        description="Status of the worst-case measurement and where its readings are "
        "(reports/budget.measured.json); the readings stay out of budget.json.",
    )
    solver: dict[str, Any] | None = Field(
        default=None, description="When over budget: what fits and the changes that would."
    )
    solver_summary: str = ""
    measured_cpu: MeasuredCpu | None = Field(
        default=None, description="Older packages: the smoke run's peak RSS (replaced by measured)."
    )


class QualityReport(_Report):
    """Stage ``evaluate``: perplexity, agreement, logit errors and adapter survival.

    The per-model and survival sections keep the evaluation's own keys (docs/quantization.md
    documents them); this model fixes the top-level shape.
    """

    model_config = ConfigDict(extra="allow")

    protocol: dict[str, Any] = Field(default_factory=dict)
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    relative_logit_error: dict[str, float] = Field(default_factory=dict)
    survival: dict[str, Any] | None = None
