"""The small typed value passed from one pipeline stage to the next."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Artifact:
    """A directory on disk plus what the stage that wrote it knows about it.

    Attributes:
        kind: what the directory holds: ``hf`` (a Hugging Face model directory), ``hf-quantized``
            (a GPTQ/AWQ checkpoint), ``onnx-genai`` (an onnxruntime-genai model folder).
        path: the directory.
        meta: facts later stages and the manifest need (dtype, quantization settings, hashes...).
    """

    kind: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    def with_meta(self, **extra: Any) -> Artifact:
        """Return a copy whose meta has ``extra`` merged in."""
        return Artifact(self.kind, self.path, {**self.meta, **extra})
