"""rslora-deploy: adapter merge -> 4-bit quantization -> ONNX -> memory-budget check -> package.

The public API is one verb, :func:`build`. Importing this package pulls in no torch, gptqmodel or
onnxruntime: stages import their backends when they run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rslora_deploy._version import __version__
from rslora_deploy.config import BuildConfig, load_recipe
from rslora_deploy.errors import RsloraDeployError
from rslora_deploy.profiles import DeviceProfile, load_profile

__all__ = [
    "BuildConfig",
    "DeviceProfile",
    "RsloraDeployError",
    "__version__",
    "build",
    "load_profile",
    "load_recipe",
]

if TYPE_CHECKING:
    from rslora_deploy.api import BuildResult


def build(config: BuildConfig, **kwargs: Any) -> BuildResult:
    """Run the whole pipeline; see :func:`rslora_deploy.api.build`."""
    from rslora_deploy.api import build as _build

    return _build(config, **kwargs)
