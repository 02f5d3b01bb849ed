"""Stage ``load``: resolve and check the base model and adapter paths before any work starts.

Nothing heavy happens here except converting a ``.gguf`` base once into the cache. Every check that
can fail on bad input runs first, so a build with a wrong path fails in a second, not after GPTQ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from rslora_deploy.artifact import Artifact
from rslora_deploy.config import BuildConfig
from rslora_deploy.data import assets
from rslora_deploy.errors import ConfigError, InputError
from rslora_deploy.model_view import model_view
from rslora_deploy.stages.base_checks import check_base_model, check_gguf

if TYPE_CHECKING:
    from rslora_deploy.stages.base import StageContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedInputs:
    """The base model directory and adapter directory a build will use."""

    base: Artifact
    adapter_dir: Path | None
    is_default_base: bool
    runtime_adapters: tuple[tuple[str, Path], ...] = ()
    """``(name, directory)`` of each run-time adapter of a multi-adapter build, in order."""


def resolve_base(base: Path | None) -> tuple[Path, bool]:
    """Return ``(hf_dir, is_default)`` for a ``--base`` value.

    Raises:
        InputError: the path does not exist, is not readable, or is not a model.
    """
    if base is None:
        return assets.fetch_smollm2(), True
    path = Path(base).expanduser()
    if not path.exists():
        raise InputError(
            f"base model path {path} does not exist; pass a Hugging Face model directory or a "
            ".gguf file, or omit --base for the default SmolLM2-135M"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(
                f"base model {path} is a file but not a .gguf; pass a GGUF file or a directory"
            )
        check_gguf(path)
        return assets.convert_gguf(
            path, assets.gguf_cache_dir(path), source={"file": str(path)}
        ), False
    check_base_model(path)
    return path, False


def resolve_adapter(config: BuildConfig, is_default_base: bool) -> Path | None:
    """The adapter directory to merge, or None.

    With no ``adapter.path`` the embedded demo adapter is merged into the default base (it was
    trained on SmolLM2-135M); a user base gets no adapter unless one is named.
    """
    if not config.merged_adapter_wanted:
        return None  # a multi-adapter build ships the base unmerged
    path = config.adapter.path
    if path is None:
        if config.adapter.use_demo_adapter and is_default_base:
            from rslora_deploy.adapters import demo_adapter_dir

            return demo_adapter_dir()
        return None
    return checked_adapter_dir(Path(path))


def checked_adapter_dir(path: Path, name: str | None = None) -> Path:
    """``path`` if it is a directory some registered adapter format claims.

    Raises:
        InputError: no such directory (naming the adapter ``name`` when given).
        AdapterFormatError: no format claims it (E001 names what was expected).
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        label = f"adapter {name!r}: path" if name else "adapter path"
        raise InputError(
            f"{label} {path} {what}; pass the directory holding rslora_config.json or "
            "adapter_config.json"
        )
    from rslora_deploy.adapters.detect import detect_format

    detect_format(path)
    return path


def load_inputs(config: BuildConfig) -> ResolvedInputs:
    """Resolve the base model and adapter of a build (stage ``load``)."""
    base_dir, is_default = resolve_base(config.base)
    view = model_view(base_dir)
    adapter_dir = resolve_adapter(config, is_default)
    if config.quantize.calib_path is not None and config.quantize.method != "rtn":
        from rslora_deploy.data.calibration import read_calibration_file

        # Read now, so a bad --calib fails in a second rather than after the merge.
        read_calibration_file(config.quantize.calib_path)
    logger.info(
        "base %s (%s, %d layers, hidden %d); adapter %s",
        base_dir,
        view.architecture,
        view.layers,
        view.hidden,
        adapter_dir or "none",
    )
    runtime = tuple((a.name, checked_adapter_dir(a.path, a.name)) for a in config.adapters)
    base = Artifact("hf", base_dir, {"model": view.to_dict(), "default_asset": is_default})
    return ResolvedInputs(base, adapter_dir, is_default, runtime)


class LoadStage:
    """Stage ``load``: resolve the base model and adapter; check the build can start."""

    name: ClassVar[str] = "load"

    def section(self, config: BuildConfig) -> BuildConfig:
        """Load reads the top-level paths and the adapter section: the whole config."""
        return config

    def run(self, artifact: Artifact, cfg: BuildConfig, ctx: StageContext) -> Artifact:
        """Resolve the inputs into ``ctx.inputs``; return the base model artifact."""
        inputs = load_inputs(cfg)
        if cfg.quantize.protect_adapter and inputs.adapter_dir is None:
            raise ConfigError(
                "--protect-adapter keeps the adapter's modules at 8 bits, but this build merges "
                "no adapter; pass --adapter or drop --protect-adapter"
            )
        if cfg.adapters:
            from rslora_deploy.stages.adapters import load_runtime_adapter

            # Every run-time adapter is read and checked against the base now, not after GPTQ.
            for spec in cfg.adapters:
                load_runtime_adapter(inputs.base.path, spec)
        ctx.inputs = inputs
        return inputs.base
