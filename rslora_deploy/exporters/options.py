"""The ``[export]`` section's base: what every exporter's options class starts from.

A recipe's ``[export]`` is validated against the options class of the profile's exporter
(``Exporter.config_class``), so one exporter's settings never reach another: a genai-only field on
an Ascend profile is refused naming the field, the exporter and what it accepts. These classes
are plain pydantic (no torch, no onnx), so validating a recipe stays as cheap as importing the
package (tests/unit/test_lean_import.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from rslora_deploy.errors import ConfigError, validation_message

C = TypeVar("C", bound="ExportConfig")


class ExportConfig(BaseModel):
    """Options every exporter honours; each exporter's class adds its own (docs/export.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_length: int | None = Field(
        default=None,
        gt=0,
        description="Context length the package is built for (the KV cache its runtime "
        "allocates); None takes the profile's max_seq_len.",
    )

    @classmethod
    def accepted(cls) -> list[str]:
        """The option names this class accepts, in declaration order."""
        return list(cls.model_fields)

    @classmethod
    def parse(cls: type[C], value: object, owner: str) -> C:
        """Validate raw ``[export]`` data (or another options object) into this class.

        A field this class does not have is refused on its own, naming ``owner`` (e.g. "the
        ascend-om exporter (profile ascend-310p-2gb)") and the accepted fields, rather than as
        pydantic's bare "extra inputs are not permitted". An options object of another class is
        re-read from the fields that were set on it, so its defaults never count as a choice.

        Raises:
            ValidationError: located at the bad field (``BuildConfig`` prefixes ``export``).
        """
        if isinstance(value, cls):
            return value
        data = value.model_dump(exclude_unset=True) if isinstance(value, BaseModel) else value
        if isinstance(data, Mapping):
            accepted = cls.accepted()
            unknown = [key for key in data if key not in accepted]
            if unknown:
                error = PydanticCustomError(
                    "export_option",
                    "not an option of {owner}, which accepts: {accepted}",
                    {"owner": owner, "accepted": ", ".join(accepted)},
                )
                details = [InitErrorDetails(type=error, loc=(k,), input=data[k]) for k in unknown]
                raise ValidationError.from_exception_data(cls.__name__, details)
        return cls.model_validate(data)

    @classmethod
    def of(cls: type[C], cfg: ExportConfig, exporter: str) -> C:
        """``cfg`` as this class: what an exporter's ``export``/``check_config`` starts with.

        ``BuildConfig`` already holds the profile's exporter's class; this narrows the type for
        the exporter (and reads a bare :class:`ExportConfig` a caller built by hand).

        Raises:
            ConfigError: ``cfg`` sets a field this exporter does not accept.
        """
        try:
            return cls.parse(cfg, f"the {exporter} exporter")
        except ValidationError as exc:
            raise ConfigError(f"invalid [export]: {validation_message(exc, 'export')}") from None
