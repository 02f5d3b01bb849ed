"""Build configuration: pydantic models that map 1:1 onto a recipe TOML file.

A recipe has the sections ``[adapter] [merge] [quantize] [export] [eval] [package]``; every field
is documented here once (``Field(description=...)``) and nowhere else. ``load_recipe`` reads a TOML
file into :class:`BuildConfig`; the resolved config is written into every package's manifest.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rslora_deploy.errors import ConfigError, validation_message
from rslora_deploy.exporters.options import ExportConfig

SCHEMA_VERSION = 1


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ComputeDtype = Literal["auto", "bfloat16", "float16", "float32"]


class MergeDtype(str, Enum):
    """Output dtype of the merged model (``auto`` keeps the base's dtype)."""

    AUTO = "auto"
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class AdapterConfig(_Section):
    """Which adapter to merge and which of the format's safety checks to relax."""

    path: Path | None = Field(
        default=None,
        description="Adapter directory (RS-LoRA v1, PEFT LoRA or PEFT VeRA; detected from its "
        "files). None: the embedded demo adapter for the default base, nothing for other bases.",
    )
    use_demo_adapter: bool = Field(
        default=True,
        description="With no path and the default SmolLM2 base, merge the embedded RS-LoRA demo "
        "adapter. False deploys the base model as it is.",
    )
    allow_base_mismatch: bool = Field(
        default=False, description="Downgrade E010 (adapter trained on another base) to a warning."
    )
    allow_unverified_vera_regeneration: bool = Field(
        default=False,
        description="Regenerate VeRA projections saved with save_projection=False (E071 "
        "otherwise).",
    )
    allow_full_module_overrides: bool = Field(
        default=False,
        description="Copy PEFT modules_to_save tensors and trainable_token_indices rows into the "
        "base (exact shape and dtype checks); E070 otherwise.",
    )
    rename: dict[str, str] = Field(
        default_factory=dict,
        description="Module-name prefixes, old -> new, applied to the adapter's recorded module "
        "names before they are looked up in the base (spec 5.2 step 1), e.g. "
        '{"model.language_model" = "model"}. Longest prefix wins; projection seeds keep the '
        "recorded names.",
    )

    @field_validator("rename")
    @classmethod
    def _check_rename(cls, value: dict[str, str]) -> dict[str, str]:
        from rslora_deploy.adapters.rename import check_rename_map

        try:
            return check_rename_map(value)
        except ConfigError as exc:
            raise ValueError(exc.message) from None


#: A run-time adapter's name: a plain identifier (it names files and the runner's --adapter).
ADAPTER_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,63}$"


class NamedAdapterConfig(AdapterConfig):
    """One adapter of a multi-adapter package, shipped unmerged and switched at run time."""

    name: str = Field(
        pattern=ADAPTER_NAME_PATTERN,
        description="The adapter's name in the package (a plain identifier, not 'base').",
    )
    path: Path = Field(description="Adapter directory (RS-LoRA v1, PEFT LoRA or PEFT VeRA).")

    @field_validator("name")
    @classmethod
    def _not_base(cls, value: str) -> str:
        if value == "base":
            raise ValueError("'base' names the base model without an adapter; pick another name")
        return value


class MergeConfig(_Section):
    """How the adapter's delta is added to the base weights (spec section 5)."""

    dtype: MergeDtype = Field(
        default=MergeDtype.FLOAT32,
        description="dtype the merged weights are rounded to, once, from fp32. float32 keeps the "
        "small delta intact for the quantizer.",
    )
    untie: bool = Field(
        default=False,
        description="Allow merging into a tied embedding/lm_head by untying them (doubles that "
        "matrix's memory).",
    )
    fidelity_warn_threshold: float = Field(
        default=0.05, gt=0, description="Warn when a module's relative merge error exceeds this."
    )


class QuantizeConfig(_Section):
    """Weight-only quantization of the merged model."""

    method: str = Field(
        default="gptq",
        description="A registered quantizer (rslora_deploy.quantizers.QUANTIZERS): gptq, awq or "
        "rtn by default.",
    )
    bits: int = Field(default=4, description="Weight bits: 4 or 8.")
    group_size: int = Field(
        default=64,
        description="Columns sharing one scale. Must divide every quantized layer's input width "
        "(SmolLM2: 576 and 1536, so 64, not 128).",
    )
    sym: bool | None = Field(
        default=None,
        description="Symmetric grid (zero point fixed at the middle code). None: False for gptq "
        "(a zero point per group: the GPTQ format and the exported MatMulNBits store zero points "
        "either way, so it costs no bytes and no speed; docs/export.md), True for rtn and awq "
        "(gptqmodel loads an asymmetric GPTQ checkpoint only if gptqmodel wrote it).",
    )
    desc_act: bool = Field(
        default=False,
        description="GPTQ act-order: quantize columns by decreasing Hessian diagonal.",
    )
    damp_percent: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="GPTQ Hessian damping, a fraction of its mean diagonal.",
    )
    calib_samples: int = Field(default=32, ge=1, description="Number of calibration sequences.")
    calib_seq_len: int = Field(default=256, ge=16, description="Tokens per calibration sequence.")
    calib_path: Path | None = Field(
        default=None,
        description="Calibration text: .txt (blank-line separated documents) or .jsonl with a "
        "'text' field. None uses the calibration split of the fetched Brown corpus.",
    )
    batch_size: int = Field(default=8, ge=1, description="Calibration batch size for gptqmodel.")
    protect_adapter: bool = Field(
        default=False,
        description="Keep modules whose adapter delta is small against the int4 step at 8 bits "
        "(gptqmodel dynamic config); the size cost goes into the report.",
    )
    protect_ratio: float = Field(
        default=0.15,
        gt=0,
        description="With protect_adapter: protect modules with rms(delta)/step below this.",
    )
    mse: float = Field(
        default=0.0,
        ge=0.0,
        description="GPTQ clipping search: shrink each group's range while the p-norm error "
        "falls (gptqmodel's mse; 2.4 recovered 64% vs 53% of RTN's loss on SmolLM2, at 1.4x "
        "the time: docs/benchmarks-quantize.md); 0 disables.",
    )
    compute_dtype: ComputeDtype = Field(
        default="auto",
        description="dtype gptqmodel loads the model in for calibration. auto: bfloat16 on a "
        "CPU with native bf16 (avx512_bf16/amx_bf16/Arm bf16; GPTQ on SmolLM2 155 s -> 98 s) "
        "or for AWQ (half precision only), else float32 (bf16 without hardware support made "
        "GPTQ 2.8x slower: 499 s vs 181 s). Unquantized tensors are restored to the source's "
        "fp32 afterwards.",
    )
    seed: int = Field(default=0, description="Seed for calibration sampling.")

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, value: int) -> int:
        if value not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {value}")
        return value

    @field_validator("group_size")
    @classmethod
    def _check_group(cls, value: int) -> int:
        if value != -1 and (value < 16 or value & (value - 1)):
            raise ValueError(f"group_size must be -1 or a power of two >= 16, got {value}")
        return value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from rslora_deploy.quantizers import QUANTIZERS

        if value not in QUANTIZERS:
            raise ValueError(f"unknown method {value!r}; registered: {', '.join(QUANTIZERS)}")
        return value

    @model_validator(mode="after")
    def _resolve_sym(self) -> QuantizeConfig:
        if self.sym is None:
            object.__setattr__(self, "sym", self.method != "gptq")
        return self

    @model_validator(mode="after")
    def _check_compute_dtype(self) -> QuantizeConfig:
        # Each method says which dtypes it runs in (AWQ: half precision only). The handler
        # modules import no backend at module level, so this check is cheap.
        from rslora_deploy.quantizers import QUANTIZERS
        from rslora_deploy.quantizers.compute_dtype import native_bf16, resolve_compute_dtype

        allowed = QUANTIZERS.get(self.method).compute_dtypes
        if self.compute_dtype == "auto":
            resolved = resolve_compute_dtype("auto", allowed, native_bf16())
            object.__setattr__(self, "compute_dtype", resolved)
        if self.compute_dtype not in allowed:
            raise ValueError(
                f"compute_dtype {self.compute_dtype} is not supported by method {self.method}; "
                f"use {' or '.join(allowed)}"
            )
        return self


class EvalConfig(_Section):
    """Quality evaluation run as part of the build."""

    enabled: bool = Field(default=True, description="Evaluate perplexity during the build.")
    windows: int = Field(default=8, ge=1, description="Number of evaluation windows.")
    window_len: int = Field(default=512, ge=16, description="Tokens per window, BOS included.")
    survival_genre: str | None = Field(
        default=None,
        description="Brown genre of the adapter's own domain, where adapter survival is measured. "
        "None: the demo adapter's genre for the demo adapter, all genres otherwise.",
    )
    survival_threshold: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Warn (log, manifest, model card and the build's last lines) when the "
        "quantized model retains less of the adapter's effect than this. None: the profile's "
        "survival_threshold (0.5 in the shipped profiles).",
    )


class PackageConfig(_Section):
    """What goes into the final package directory."""

    keep_quantized_checkpoint: bool = Field(
        default=False, description="Also copy the Hugging Face GPTQ/AWQ checkpoint to quantized/."
    )


class BuildConfig(_Section):
    """Everything ``build()`` needs. Field names are the recipe keys and, kebab-cased, CLI flags."""

    schema_version: int = Field(default=SCHEMA_VERSION, description="Recipe schema version.")
    profile: str = Field(description="Device profile name (device_profiles/*.toml), e.g. t4-2gb.")
    base: Path | None = Field(
        default=None,
        description="Base model: a Hugging Face model directory or a .gguf file. None uses the "
        "fetched SmolLM2-135M-Instruct.",
    )
    out: Path = Field(default=Path("out/package"), description="Package directory to write.")
    overwrite: bool = Field(default=False, description="Replace an existing package at out.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="[adapter]")
    adapters: list[NamedAdapterConfig] = Field(
        default_factory=list,
        description="[[adapters]]: several named adapters shipped unmerged over one int4 base and "
        "switched at run time (docs/adapters-runtime.md); empty: [adapter] is merged.",
    )
    merge: MergeConfig = Field(default_factory=MergeConfig, description="[merge]")
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig, description="[quantize]")
    export: SerializeAsAny[ExportConfig] = Field(
        default_factory=ExportConfig,
        validate_default=True,
        description="[export]: the options of the profile's exporter (its config_class, e.g. "
        "exporters/genai/options.py); another exporter's options are refused.",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="[eval]")
    package: PackageConfig = Field(default_factory=PackageConfig, description="[package]")

    @field_validator("profile")
    @classmethod
    def _profile_has_an_exporter(cls, value: str) -> str:
        # The profile decides which options [export] may hold, so it is read here, once the
        # name is known: an unknown name, a bad file or an unregistered exporter is this field's
        # error, before the export section is looked at.
        export_options(value)
        return value

    @field_validator("adapters")
    @classmethod
    def _unique_adapter_names(cls, value: list[NamedAdapterConfig]) -> list[NamedAdapterConfig]:
        seen: set[str] = set()
        for adapter in value:
            if adapter.name in seen:
                raise ValueError(f"two adapters are named {adapter.name!r}; give each its own name")
            seen.add(adapter.name)
        return value

    @model_validator(mode="after")
    def _merged_or_runtime(self) -> BuildConfig:
        if self.adapters and self.adapter.path is not None:
            raise ValueError(
                "adapter.path (one merged adapter) and adapters (run-time adapters) are both set; "
                "pass one adapter to merge it, or name each one (NAME=DIR) to ship them unmerged"
            )
        return self

    @property
    def merged_adapter_wanted(self) -> bool:
        """Whether [adapter] is merged: not in a multi-adapter build (the base ships unmerged)."""
        return not self.adapters

    @field_validator("export", mode="before")
    @classmethod
    def _exporters_own_options(cls, value: object, info: ValidationInfo) -> object:
        profile = info.data.get("profile")
        if profile is None:
            return ExportConfig()  # the profile's own error says what is wrong
        exporter, options = export_options(profile)
        return options.parse(value, f"the {exporter} exporter (profile {profile})")

    def to_json_dict(self) -> dict[str, Any]:
        """The resolved config as JSON-ready data, as written into the manifest."""
        return self.model_dump(mode="json")


def export_options(profile: str) -> tuple[str, type[ExportConfig]]:
    """The exporter a profile names and that exporter's options class.

    Only the exporter's class is imported (its module is light; the backend loads in
    ``export``), so a recipe validates without onnx or torch.

    Raises:
        ConfigError: unknown profile, invalid profile file, or an exporter not registered.
    """
    from rslora_deploy.exporters import EXPORTERS
    from rslora_deploy.profiles import load_profile

    name = load_profile(profile).exporter
    if name not in EXPORTERS:
        raise ConfigError(
            f"profile {profile}: unknown exporter {name!r}; registered: {', '.join(EXPORTERS)}"
        )
    return name, EXPORTERS.get(name).config_class


def make_config(data: dict[str, Any]) -> BuildConfig:
    """Validate ``data`` into a :class:`BuildConfig`.

    Raises:
        ConfigError: naming every invalid field.
    """
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid build config: {validation_message(exc)}") from None


def load_recipe(path: Path, **overrides: Any) -> BuildConfig:
    """Read a recipe TOML and apply CLI overrides (top-level keys or ``section.key``).

    Raises:
        ConfigError: unreadable file, bad TOML or an invalid field.
    """
    from rslora_deploy.untrusted import read_toml

    data = read_toml(Path(path), "recipe")
    return make_config(apply_overrides(data, overrides))


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return ``data`` with ``{"quantize.method": "rtn", "profile": ...}`` style overrides set."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, field = key.rpartition(".")
        if section:
            merged.setdefault(section, {})[field] = value
        else:
            merged[field] = value
    return merged
