"""What a manifest records about how a package was made, without making its bytes depend on when.

* Tool and library versions, read from the installed distributions' metadata (nothing imported).
* A creation time only when ``SOURCE_DATE_EPOCH`` is set (the reproducible-builds convention,
  https://reproducible-builds.org/specs/source-date-epoch/): by default a package holds no clock
  reading, so two builds of the same inputs are byte-identical (docs/reproducibility.md).
* :data:`RUN_MEASUREMENTS`: the package files that record measurements of the build run itself
  (wall time, peak RSS); they are named in the manifest's ``nondeterministic`` list and not hashed.
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

#: Distributions whose versions decide a package's bytes (weights, graph, tokenizer files).
KEY_LIBRARIES = (
    "torch",
    "transformers",
    "gptqmodel",
    "safetensors",
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxruntime-genai",
    "tokenizers",
)

#: ``{path, why}`` of package files that differ from run to run by nature.
RUN_MEASUREMENTS: tuple[dict[str, str], ...] = (
    {
        "path": "reports/build.json",
        "why": "measurements of this build run: wall time and peak RSS per stage, and the peak "
        "RSS and decode speed of the verify run; they vary with machine load",
    },
    {
        "path": "reports/budget.measured.json",
        "why": "the worst-case memory probe's readings (peak RSS or device memory) and the "
        "machine they were read on",
    },
    {
        "path": "reports/budget.html",
        "why": "draws the measured worst-case peak beside the estimate",
    },
)


def library_versions() -> dict[str, str | None]:
    """``name -> version`` of :data:`KEY_LIBRARIES` (None when not installed), plus Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in KEY_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def tool_record() -> dict[str, Any]:
    """The manifest's ``tool``: name, version and :func:`library_versions`."""
    from rslora_deploy._version import __version__

    return {"name": "rslora-deploy", "version": __version__, "libraries": library_versions()}


def source_date() -> str | None:
    """``SOURCE_DATE_EPOCH`` as an ISO-8601 UTC time, or None when unset or not an integer."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw.isdigit():
        return None
    return datetime.fromtimestamp(int(raw), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
