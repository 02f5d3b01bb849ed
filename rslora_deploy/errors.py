"""Exception tree for rslora-deploy.

Every error the tool raises on bad input is a :class:`RsloraDeployError`. The CLI turns one into a
single line on stderr (``error E040: ...``) and exit code 1, without a traceback unless
``RSLORA_DEPLOY_DEBUG=1``. Errors from the RS-LoRA catalogue (docs/rslora-format-v1.md section 5.5)
carry their stable code, so users can search for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class RsloraDeployError(Exception):
    """Base class for every error this package raises on purpose.

    Args:
        message: what failed, observed vs expected where it applies, and the fix.
        code: optional stable error code (``E001`` ... ``E080``) from the format spec.
    """

    exit_code: int = 1
    default_code: str | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        self.code = code or self.default_code
        self.message = message
        super().__init__(f"{self.code}: {message}" if self.code else message)


class ConfigError(RsloraDeployError, ValueError):
    """A config, recipe, profile or CLI value is invalid (names the field)."""


class UsageError(ConfigError):
    """The command line itself is malformed (exit code 2)."""

    exit_code = 2


class InputError(RsloraDeployError):
    """An input path is missing, unreadable or of the wrong kind."""


class UnsupportedError(RsloraDeployError):
    """A format, architecture, module type or option is not supported."""


class MissingDependencyError(RsloraDeployError, ImportError):
    """An optional backend is not installed; the message gives the pip command."""


class AdapterFormatError(RsloraDeployError):
    """An adapter checkpoint violates its format (RS-LoRA v1, PEFT LoRA, PEFT VeRA)."""


class ChecksumError(AdapterFormatError):
    """A stored checksum does not match the data (E002, E040)."""


class BaseMismatchError(AdapterFormatError):
    """The adapter was trained on a different base model (E010)."""

    default_code = "E010"


class Bnb4CheckpointError(InputError):
    """A bitsandbytes 4-bit (QLoRA) base checkpoint is malformed (E061; names the tensor)."""

    default_code = "E061"


class MergeError(RsloraDeployError):
    """Merging a delta into the base weights failed."""


class ShapeMismatchError(MergeError):
    """Shapes of the layer, config and factors disagree (E022)."""

    default_code = "E022"


class NonFiniteError(MergeError):
    """NaN or Inf in an adapter tensor, a delta or a merged weight (E030)."""

    default_code = "E030"


class QuantizationError(RsloraDeployError):
    """Quantization could not run or produced an invalid result."""


class CalibrationDataError(QuantizationError):
    """The calibration data is empty, too short or unreadable."""


class ExportError(RsloraDeployError):
    """Export to ONNX failed."""


class ExportValidationError(ExportError):
    """The exported model does not match the source model."""


class ToleranceError(ExportValidationError):
    """Outputs differ by more than the allowed tolerance."""


class BudgetExceededError(RsloraDeployError):
    """The artifact was built but does not fit the device profile's memory (exit code 3)."""

    exit_code = 3


class AssetError(RsloraDeployError):
    """A default asset (model, corpus) is missing or fails its checksum."""


class NonFiniteQuantizationError(QuantizationError):
    """NaN or Inf appeared during calibration or in a quantized tensor."""


def validation_message(exc: ValidationError, prefix: str = "") -> str:
    """Turn pydantic's multi-line report into one line naming each bad field.

    It lives here, beside the errors it feeds, so that every schema module (config, profiles,
    the exporters' options) can use it without importing another. ``prefix`` names the
    section a nested model was validated for (``export``), so a field reads as in a recipe.
    """
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "") or "config"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
