"""Stage ``export_adapters``: a multi-adapter package's run-time adapters, beside one base.

With ``[[adapters]]`` (``--adapter NAME=DIR``, repeated) nothing is merged: the base is quantized
and exported as it is, and this stage asks the profile's exporter to give the graph adapter inputs
(zero-rank defaults: no adapter active is the base) and to write one run-time file per adapter
(docs/adapters-runtime.md). Each adapter's source ships beside its file, as given, under
``adapters/<name>/source/``: an RS-LoRA v1 adapter is its few-KB seed checkpoint, which the
package's runner can turn back into the same file on the device.

Every adapter is loaded and checked (format, checksums, the base it records, E010) before the
graph is touched, so a bad one fails the build naming it, with nothing written.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rslora_deploy.artifact import Artifact
from rslora_deploy.config import BuildConfig, NamedAdapterConfig
from rslora_deploy.exporters.base import RuntimeAdapter

if TYPE_CHECKING:
    from rslora_deploy.adapters.delta import ModuleDelta
    from rslora_deploy.stages.base import StageContext

logger = logging.getLogger(__name__)

ADAPTERS_DIR = "adapters"
SOURCE_DIR = "source"


def load_runtime_adapter(base_dir: Path, spec: NamedAdapterConfig) -> tuple[RuntimeAdapter, dict]:
    """Load one named adapter against the base: its deltas (renamed) and its manifest facts.

    Raises:
        RsloraDeployError: the catalogue's errors for a bad adapter, or E010 for another base.
    """
    from rslora_deploy.adapters.merge_math import verify_base
    from rslora_deploy.adapters.rename import apply_renames
    from rslora_deploy.stages.merge import _load_adapter, check_base_dir

    check_base_dir(base_dir)
    rename = dict(spec.rename)
    adapter, _ = _load_adapter(base_dir, Path(spec.path), spec, rename)
    renamed = apply_renames([*adapter.deltas, *adapter.overrides], rename)
    if adapter.overrides:
        from rslora_deploy.errors import UnsupportedError

        raise UnsupportedError(
            f"adapter {spec.name!r} replaces whole tensors (modules_to_save / trainable tokens), "
            "which a run-time adapter cannot carry; build it merged with a single --adapter"
        )
    recorded = sorted({d.recorded_name or d.name for d in adapter.deltas})
    base_check = verify_base(
        base_dir,
        adapter.base_hashes,
        recorded,
        allow_mismatch=spec.allow_base_mismatch,
        live_names=renamed,
    )
    check_against_base(spec.name, adapter.deltas, base_dir)
    ranks = sorted({d.rank for d in adapter.deltas if d.rank is not None})
    facts = {
        "name": spec.name,
        "format": adapter.format,
        "source_sha256": adapter.meta.get("sha256"),
        "targets": sorted({d.name.rpartition(".")[2] for d in adapter.deltas}),
        "modules": len(adapter.deltas),
        "ranks": ranks,
        "trainable_parameters": adapter.meta.get("trainable_parameters"),
        "base_check": base_check,
        "rename": rename,
    }
    return RuntimeAdapter(spec.name, adapter.deltas), facts


def check_against_base(name: str, deltas: list[ModuleDelta], base_dir: Path) -> None:
    """Every delta's module is a 2-D weight of the base with the delta's shape (headers only).

    Raises:
        ShapeMismatchError: naming the adapter, the module and both shapes.
    """
    from rslora_deploy.adapters.base_hash import safetensors_files
    from rslora_deploy.adapters.st_io import SafetensorsFile
    from rslora_deploy.errors import ShapeMismatchError

    shapes: dict[str, tuple[int, ...]] = {}
    for path in safetensors_files(base_dir):
        header = SafetensorsFile(path)
        shapes.update({key: header.shape(key) for key in header.keys()})  # noqa: SIM118 (not a dict)
    for delta in deltas:
        shape = shapes.get(f"{delta.name}.weight")
        if shape is None:
            raise ShapeMismatchError(
                f"adapter {name!r} targets {delta.name}, which the base has no weight for; the "
                "adapter was trained on another model (or pass a rename map)"
            )
        # VeRA's shared vera_A is wider than a layer; only its rows and B's are fixed here.
        d_in_fixed = not delta.source.get("slice_in_from_layer")
        want = (delta.d_out, delta.d_in)
        if len(shape) != 2 or shape[0] != want[0] or (d_in_fixed and shape[1] != want[1]):
            raise ShapeMismatchError(
                f"adapter {name!r}: {delta.name} has shape {list(want)} but the base's weight is "
                f"{list(shape)}; the adapter was trained on another model"
            )


class RuntimeAdaptersStage:
    """Stage ``export_adapters``: adapter inputs in the graph, one file and source per adapter."""

    name: ClassVar[str] = "export_adapters"

    def section(self, config: BuildConfig) -> list[NamedAdapterConfig]:
        """The ``[[adapters]]`` list."""
        return config.adapters

    def run(self, artifact: Artifact, cfg: list[NamedAdapterConfig], ctx: StageContext) -> Artifact:
        """Pass a single-adapter build through; otherwise write ``adapters/`` (module doc)."""
        if not cfg:
            return artifact
        from rslora_deploy.model_view import model_view

        assert ctx.inputs is not None, "the load stage sets ctx.inputs"
        base_dir = ctx.inputs.base.path
        loaded = [load_runtime_adapter(base_dir, spec) for spec in cfg]
        out_dir = ctx.staging / ADAPTERS_DIR
        records = ctx.exporter.runtime_adapters(
            artifact.path, model_view(base_dir), [adapter for adapter, _ in loaded], out_dir
        )
        manifest: list[dict[str, Any]] = []
        for spec, (_, facts), record in zip(cfg, loaded, records, strict=True):
            source = out_dir / spec.name / SOURCE_DIR
            shutil.copytree(Path(spec.path), source, symlinks=False)
            manifest.append(
                {
                    **facts,
                    "file": f"{ADAPTERS_DIR}/{record['file']}",
                    "bytes": record["bytes"],
                    "model_version": record["model_version"],
                    "node_ranks": record["rank"],
                    "source": f"{ADAPTERS_DIR}/{spec.name}/{SOURCE_DIR}",
                }
            )
            logger.info("adapter %s: %s, %d bytes", spec.name, record["file"], record["bytes"])
        ctx.runtime_adapters = manifest
        return Artifact(artifact.kind, artifact.path, {**artifact.meta, "adapters": len(cfg)})
