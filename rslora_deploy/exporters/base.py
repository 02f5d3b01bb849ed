"""The exporter contract: what the pipeline asks of the code that writes a package's ``model/``.

An exporter owns everything that depends on the runtime that will load the package: the graph it
writes, how that graph is smoke-tested, how many bytes per activation element it uses, which
projections it fuses into one node (so they must share a precision), and the memory its graph
allocates beyond the weights. The budget, verify and quantize stages ask the profile's exporter
instead of branching on a target string, so a second exporter is one module plus one registration
line in :mod:`rslora_deploy.exporters` (docs/DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from rslora_deploy.adapters.delta import ModuleDelta
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.exporters.options import ExportConfig
    from rslora_deploy.model_view import ModelView
    from rslora_deploy.profiles import DeviceProfile


#: The prompt every exporter's smoke test generates from (the package's model card shows the text).
DEFAULT_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class Shape:
    """What a package's runtime is sized for: the budget's inputs beyond the model and profile.

    Attributes:
        max_length: context length the KV cache is allocated for.
        batch: concurrent sequences.
        last_token_logits: the graph returns the last position's logits only during prefill.
        float_lm_head: lm_head is a float MatMul (not int4).
        level4_nbits_bytes: weight bytes of the graph's ``MatMulNBits`` nodes at
            ``accuracy_level`` 4 (int8 activations on CPU), each initializer once.
        gears: a static-shape graph's compiled new-token counts per call (the largest sizes
            its prefill buffers); empty for a graph with dynamic shapes.
    """

    max_length: int
    batch: int
    last_token_logits: bool = True
    float_lm_head: bool = True
    level4_nbits_bytes: int = 0
    gears: tuple[int, ...] = ()

    @classmethod
    def of(cls, profile: DeviceProfile, last_token_logits: bool = True) -> Shape:
        """The profile's own max_seq_len and batch size."""
        return cls(profile.max_seq_len, profile.batch_size, last_token_logits)


class Exporter(Protocol):
    """One way of turning a (quantized) Hugging Face checkpoint into a device's model folder.

    Implementations are classes registered in ``EXPORTERS``; the pipeline instantiates them with
    no arguments, so all settings come from the exporter's own options (``config_class``, which
    a recipe's ``[export]`` is validated into) and the ``DeviceProfile``.
    """

    name: ClassVar[str]
    """Registry key; a profile names its exporter with it (``exporter = "onnxruntime-genai"``)."""

    runtime: ClassVar[str]
    """What loads the package on the device, for the manifest and model card."""

    fused_groups: ClassVar[tuple[tuple[str, ...], ...]]
    """Projection names this exporter fuses into one node; members must share a precision."""

    config_class: ClassVar[type[ExportConfig]]
    """Its ``[export]`` options: :class:`ExportConfig` or a subclass, defined in a module that
    imports only pydantic (a recipe is validated against it without loading the backend)."""

    def check_config(self, cfg: ExportConfig, profile: DeviceProfile) -> None:
        """Refuse options this exporter cannot honour on ``profile``, before any work.

        ``build`` calls it before merging, so a layout the target cannot run or a compile plan
        that does not fit the profile fails in a second, not after minutes of quantizing.

        Raises:
            ConfigError: naming the field and what is allowed.
        """

    def export(
        self,
        quantized: Artifact,
        out_dir: Path,
        cfg: ExportConfig,
        profile: DeviceProfile,
        log_path: Path,
    ) -> Artifact:
        """Write the model folder at ``out_dir`` and return it as an artifact.

        ``cfg`` is an instance of ``config_class`` (``BuildConfig`` validated it so);
        ``config_class.of(cfg, name)`` narrows the type.
        """

    def smoke_test(self, model_dir: Path, profile: DeviceProfile, work: Path) -> dict[str, Any]:
        """Generate from a fixed prompt with the shipped bytes, in a child process.

        Returns the smoke report (prompt, text, speed, peak RSS of the child).
        """

    def cpu_runnable(self, model_dir: Path, profile: DeviceProfile, work: Path) -> Path:
        """A folder this machine's CPU can run (the model itself, or a view of it)."""

    def io_bytes(self, profile: DeviceProfile) -> int:
        """Bytes per activation element of the exported graph."""

    def usage(self) -> str:
        """Markdown for the package's model card: how to run ``model/`` with this runtime."""

    def package_shape(self, model_dir: Path, profile: DeviceProfile) -> Shape:
        """What the exported folder at ``model_dir`` is sized for, read from the folder itself.

        The budget prices a package at this shape, not at the profile's defaults: a recipe's
        ``export.max_length`` (or an Ascend gear list) changes what the runtime allocates.
        """

    def budget_terms(
        self, view: ModelView, profile: DeviceProfile, *, shape: Shape | None = None
    ) -> dict[str, int]:
        """Memory the graph allocates at run time besides its weights and the reserved term.

        Keys are term names (``kv_cache``, ``logits``, ``activations``...), values bytes at
        ``shape`` (the package's max_length, batch and logits layout; default the profile's);
        docs/budget.md gives each formula.
        """

    def measurement_comparable(self, profile: DeviceProfile) -> bool:
        """Whether a CPU run of this package measures what the device would use."""

    def predict_weights(
        self, view: ModelView, profile: DeviceProfile, bits: int, group_size: int
    ) -> tuple[dict[str, int], Shape]:
        """Weight bytes and shape of what this exporter would ship, before anything is built.

        ``rslora-deploy budget --model`` prices a config this way: the layout is the exporter's
        default for ``profile`` (what ``build`` would write with an empty recipe), ``bits`` and
        ``group_size`` the quantizer's. Returns (bytes per part, the package's shape).
        """

    def runtime_adapters(
        self, model_dir: Path, view: ModelView, adapters: list[RuntimeAdapter], out_dir: Path
    ) -> list[dict[str, Any]]:
        """Make the graph in ``model_dir`` take adapters at run time and write one file each.

        The graph keeps the base's own output when no adapter is active; each adapter's file
        goes to ``out_dir`` and is checked against the graph (names, dtypes, shapes, base
        build). Returns one JSON-ready record per adapter, in order (file, bytes, ranks).

        Raises:
            UnsupportedError: this exporter has no run-time adapter form (build merged).
            ExportError: an adapter does not fit the graph, naming the adapter and the input.
        """

    def check_runtime_adapter(self, model_dir: Path, adapter_file: Path, name: str) -> dict:
        """Check one run-time adapter file against the package's graph (``verify``).

        Raises:
            ExportError: naming the adapter and the first input (or base build) that differs.
        """


@dataclass(frozen=True)
class RuntimeAdapter:
    """One adapter of a multi-adapter package, in the internal representation.

    Attributes:
        name: its name in the package (a plain identifier).
        deltas: its per-module updates (rename map applied).
    """

    name: str
    deltas: list[ModuleDelta]


def kv_cache_bytes(view: ModelView, profile: DeviceProfile, seq_len: int | None = None) -> int:
    """KV cache preallocated for ``seq_len`` tokens (defaults to the profile's max_seq_len)."""
    seq = seq_len or profile.max_seq_len
    return (
        profile.batch_size * view.layers * 2 * view.kv_heads * view.head_dim * seq
        * profile.kv_bytes_per_element
    )  # fmt: skip
