"""Device profiles: the memory budget and runtime facts of one edge target.

The data lives in ``rslora_deploy/device_profiles/*.toml`` (package data, so a wheel carries it) or
in ``$RSLORA_DEPLOY_PROFILES``; this module only defines and loads the schema. ``--profile`` takes
a profile name or a path to a ``.toml`` file of the same shape.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rslora_deploy.errors import ConfigError, validation_message

GIB = 1024**3
MIB = 1024**2


class Device(str, Enum):
    """Accelerator family of the target."""

    CUDA = "cuda"
    NPU = "npu"
    CPU = "cpu"


class ExportTarget(str, Enum):
    """Where the exported graph's activations live: the dtype and kernels the exporter picks."""

    CPU = "cpu"
    """fp32 activations, CPU kernels (onnxruntime-genai builder ``-e cpu``)."""
    CUDA = "cuda"
    """fp16 activations, CUDA kernels (builder ``-e cuda``)."""
    NPU = "npu"
    """fp16 standard-op graph for an NPU graph compiler (Ascend ATC)."""


class Runtime(str, Enum):
    """The software that loads the package on the device."""

    ONNXRUNTIME_GENAI = "onnxruntime-genai"
    ONNXRUNTIME = "onnxruntime"
    ACL = "acl"
    """Ascend Computing Language (pyACL) running an ATC-compiled ``.om`` model."""


class ExecutionProvider(str, Enum):
    """ONNX Runtime execution provider (or the NPU runtime) that runs the graph."""

    CPU = "cpu"
    CUDA = "cuda"
    CANN = "cann"


class KvDtype(str, Enum):
    """Element type of the KV cache."""

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"


_KV_BYTES = {KvDtype.FLOAT16: 2, KvDtype.BFLOAT16: 2, KvDtype.FLOAT32: 4}


class ReservedMeasurement(BaseModel):
    """One measured runtime context cost: the device, driver and runtime it was read on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = Field(min_length=1, description="Device the reading was taken on.")
    driver: str = Field(description="Driver / firmware version (empty for a CPU).")
    runtime: str = Field(min_length=1, description="Runtime and provider versions.")
    date: str = Field(min_length=1, description="When (YYYY-MM or YYYY-MM-DD).")
    bytes: int = Field(gt=0, description="Context + provider cost read on that device.")
    method: str = Field(min_length=1, description="How it was read (NVML, VmHWM, ...).")


class ReservedSource(BaseModel):
    """Where a profile's ``reserved_bytes`` comes from: a measurement, or an allowance that says so.

    ``kind = "measured"`` needs at least one row in ``measurements`` and ``reserved_bytes`` no
    smaller than the largest row; ``kind = "allowance"`` is a guess and the budget report says so.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["measured", "allowance"] = Field(
        description="measured (rows below) or allowance (not measured on this device)."
    )
    note: str = Field(min_length=1, description="One line: why this number.")
    measurements: list[ReservedMeasurement] = Field(
        default_factory=list,
        description="Readings of the runtime's context-only cost (also on other devices).",
    )

    @model_validator(mode="after")
    def _measured_has_rows(self) -> ReservedSource:
        if self.kind == "measured" and not self.measurements:
            raise ValueError("kind 'measured' needs at least one [[reserved_source.measurements]]")
        return self


class DeviceProfile(BaseModel):
    """Memory budget and runtime limits of one deployment target.

    Required fields have no default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Profile name, the file stem.")
    description: str = Field(description="One line for `profiles list`.")
    device: Device = Field(description="cuda, npu or cpu.")
    runtime: Runtime = Field(description="Runtime that loads the package.")
    execution_provider: ExecutionProvider = Field(
        description="ONNX Runtime execution provider (or NPU runtime) on the device."
    )
    exporter: str = Field(
        description="Registered exporter that writes the package's model/ folder "
        "(rslora_deploy.exporters.EXPORTERS), e.g. onnxruntime-genai. Checked where a build "
        "config resolves it (config.export_options), not here: a profile is data the exporters "
        "read, so this module imports none of them."
    )
    export_target: ExportTarget = Field(
        description="Activation placement of the exported graph: cuda (fp16), cpu (fp32) or npu "
        "(fp16 standard-op graph for ATC)."
    )
    memory_bytes: int = Field(gt=0, description="Memory the deployed model may use, in bytes.")
    reserved_bytes: int = Field(
        ge=0, description="Runtime overhead charged before weights: context, kernels, workspace."
    )
    reserved_source: ReservedSource = Field(
        default_factory=lambda: ReservedSource(
            kind="allowance", note="source not stated in the profile: treat it as a guess"
        ),
        description="Where reserved_bytes comes from: measured (device, driver, date) or an "
        "allowance, stated as such. A profile that says nothing is reported as an allowance.",
    )
    model_slack: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Extra share charged on the model-dependent terms (weights, kv_cache, "
        "logits, activations) for what the runtime allocates beyond them (arena rounding, "
        "workspaces), from a measurement on this runtime (docs/budget.md).",
    )
    load_factor: float = Field(
        default=1.0,
        ge=1,
        le=10,
        description="Peak memory while loading the model, per byte of weights (initializers read, "
        "then prepacked copies made before the originals are freed), measured on this runtime.",
    )
    activation_factor: float = Field(
        default=1.0,
        gt=0,
        le=10,
        description="Measured prefill activation bytes per token over the formula's "
        "(4*hidden + 3*intermediate) * io_bytes, on this runtime.",
    )
    nbits_prepack_factor: float = Field(
        default=0.0,
        ge=0,
        le=10,
        description="Resident bytes the CPU kernel adds per byte of MatMulNBits weights run at "
        "accuracy_level 4 (its int8-activation packed copy, beyond what it frees), measured on "
        "this runtime; 0 where not measured or not applicable.",
    )
    attention_scores: bool = Field(
        default=True,
        description="Charge one layer's fp32 attention scores (heads * max_length^2 * 4); false "
        "where the runtime was measured not to materialize them (peak linear in max_length).",
    )
    supported_bits: list[int] = Field(description="Weight bit widths the runtime executes.")
    max_seq_len: int = Field(gt=0, description="Context length the KV cache is sized for.")
    batch_size: int = Field(gt=0, description="Concurrent sequences the KV cache is sized for.")
    kv_dtype: KvDtype = Field(description="KV cache dtype.")
    notes: str = Field(default="", description="Caveats shown in the budget report.")
    survival_threshold: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Warn when a build's adapter survival (retained share of the adapter's "
        "effect) is below this; a recipe's eval.survival_threshold overrides it.",
    )
    soc_versions: list[str] = Field(
        default_factory=list,
        description="Ascend SoCs the ascend-om exporter writes ATC scripts for (Ascend310P3, "
        "Ascend310B1, ...); the first is the runner's default .om. The exporter checks the "
        "names (its check_config, before any work).",
    )

    @model_validator(mode="after")
    def _reserved_covers_measurement(self) -> DeviceProfile:
        if self.reserved_source.kind == "measured":
            worst = max(m.bytes for m in self.reserved_source.measurements)
            if self.reserved_bytes < worst:
                raise ValueError(
                    f"reserved_bytes {self.reserved_bytes} is below the measured context cost "
                    f"{worst}; raise reserved_bytes to at least the measurement"
                )
        return self

    @property
    def kv_bytes_per_element(self) -> int:
        """Bytes per KV-cache element."""
        return _KV_BYTES[self.kv_dtype]


def profiles_dir() -> Path:
    """Where the named profiles live.

    ``$RSLORA_DEPLOY_PROFILES`` if set, else the packaged device_profiles/.
    """
    env = os.environ.get("RSLORA_DEPLOY_PROFILES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "device_profiles"


def list_profiles() -> list[DeviceProfile]:
    """All named profiles, sorted by name."""
    return [load_profile(p.stem) for p in sorted(profiles_dir().glob("*.toml"))]


def load_profile(name_or_path: str) -> DeviceProfile:
    """Load a profile by name (``t4-2gb``) or from a ``.toml`` path.

    Raises:
        ConfigError: unknown name (lists the known ones), unreadable file or invalid field.
    """
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = profiles_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            known = ", ".join(p.stem for p in sorted(profiles_dir().glob("*.toml"))) or "none"
            raise ConfigError(
                f"unknown profile {name_or_path!r}; known profiles: {known} "
                "(or pass a path to a .toml profile)"
            )
    from rslora_deploy.untrusted import read_toml

    data = read_toml(path, "profile")
    data.setdefault("name", path.stem)
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid profile {path}: {validation_message(exc)}") from None
