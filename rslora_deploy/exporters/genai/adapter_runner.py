"""Run a multi-adapter package: the base or one adapter at a time, switched in one process.

This file ships in every multi-adapter package as ``runner/run_adapters.py`` beside the pure-numpy
part of rslora-deploy it needs (``runner/rslora_deploy/``: the RS-LoRA v1 reader, RSG-1 and
:mod:`~rslora_deploy.exporters.genai.adapter_inputs`), so a device needs only numpy, onnxruntime
and onnxruntime-genai, never torch:

    python runner/run_adapters.py run PACKAGE --adapter NAME --prompt "..."
    python runner/run_adapters.py rebuild PACKAGE NAME OUT.onnx_adapter

onnxruntime-genai's adapter API (``og.Adapters``: ``load``, ``unload``;
``Generator.set_active_adapter``) adds an adapter to a generator and cannot take it off again,
so every switch starts a fresh generator; the weights and the loaded adapter files stay shared.
Before an adapter file is loaded its ``model_version`` is compared with this package's graph, so
a file made for another base build is refused instead of silently giving wrong output.

``rebuild`` is what makes an RS-LoRA task update a few-KB message: it regenerates the adapter's
factors from its seed checkpoint (RSG-1, spec 3.6) and writes the ``.onnx_adapter`` byte for byte
as the build did, from ``adapters/graph_inputs.json`` (the graph's LoRA inputs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

GRAPH_INPUTS = "adapters/graph_inputs.json"
BASE = "base"


def _fail(message: str) -> Exception:
    from rslora_deploy.errors import InputError

    return InputError(message)


def read_package_manifest(package: Path) -> dict[str, Any]:
    """The package's manifest; it must list run-time adapters."""
    path = Path(package) / "manifest.json"
    if not path.is_file():
        raise _fail(f"{path} not found; pass a package directory written by rslora-deploy build")
    manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if not manifest.get("adapters"):
        raise _fail(
            f"{package} holds no run-time adapters (it was built with one merged adapter); run "
            "its model/ directly, or build with --adapter NAME=DIR for several"
        )
    return manifest


def check_model_version(adapter_file: Path, model_path: Path, name: str) -> None:
    """Refuse an ``.onnx_adapter`` whose ``model_version`` is not this graph's.

    Raises:
        InputError: naming the adapter, both versions and what to do.
    """
    import onnxruntime as ort

    from rslora_deploy.exporters.genai.adapter_inputs import graph_version

    if not adapter_file.is_file():
        raise _fail(f"adapter {name!r}: {adapter_file} not found")
    try:
        got = ort.AdapterFormat.read_adapter(str(adapter_file)).get_model_version()
    except Exception as exc:  # onnxruntime raises its own fail type for a damaged file
        raise _fail(f"adapter {name!r}: {adapter_file} is not an .onnx_adapter ({exc})") from None
    want = graph_version(model_path)
    if got != want:
        raise _fail(
            f"adapter {name!r}: {adapter_file.name} was made for another base build "
            f"(model_version {got}, this package's graph is {want}); use the adapter files of "
            "this package, or rebuild them from the adapter's source"
        )


class AdapterPackage:
    """One loaded model and its adapters; generate with any of them, or with none (``base``).

    Args:
        package: the package directory (manifest.json, model/, adapters/).
        model_dir: the graph folder to run, default ``package/model`` (a CPU view of a CUDA
            package's graph on a machine without a GPU).
    """

    def __init__(self, package: Path, model_dir: Path | None = None) -> None:
        import onnxruntime_genai as og

        self.package = Path(package)
        self.manifest = read_package_manifest(self.package)
        self.model_dir = Path(model_dir) if model_dir else self.package / "model"
        self.records = {a["name"]: a for a in self.manifest["adapters"]}
        self.model = og.Model(str(self.model_dir))
        self.tokenizer = og.Tokenizer(self.model)
        self._adapters = og.Adapters(self.model)
        self.loaded: dict[str, float] = {}

    @property
    def names(self) -> list[str]:
        """The package's adapter names, in build order."""
        return list(self.records)

    def load(self, name: str, path: Path | None = None) -> float:
        """Load adapter ``name`` (its package file, or ``path``); returns the seconds it took.

        Raises:
            InputError: an unknown name, or a file made for another base build.
        """
        if path is None:
            if name not in self.records:
                raise _fail(
                    f"adapter {name!r} is not in this package; it has: {', '.join(self.names)} "
                    f"(or {BASE!r} for none)"
                )
            path = self.package / self.records[name]["file"]
        check_model_version(Path(path), self.model_dir / "model.onnx", name)
        start = time.perf_counter()
        self._adapters.load(str(path), name)
        self.loaded[name] = time.perf_counter() - start
        return self.loaded[name]

    def unload(self, name: str) -> None:
        """Drop a loaded adapter's tensors."""
        self._adapters.unload(name)
        self.loaded.pop(name, None)

    def generator(self, adapter: str = BASE, max_length: int = 256) -> Any:
        """A fresh greedy generator with ``adapter`` active (``base``: none); loads it if needed."""
        import onnxruntime_genai as og

        if adapter != BASE and adapter not in self.loaded:
            self.load(adapter)
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=max_length)
        generator = og.Generator(self.model, params)
        if adapter != BASE:
            generator.set_active_adapter(self._adapters, adapter)
        return generator

    def prefill_logits(self, ids: np.ndarray, adapter: str = BASE) -> np.ndarray:
        """The logits the prompt-processing call returns for ``ids`` with ``adapter`` active."""
        generator = self.generator(adapter, max_length=len(ids) + 1)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        return np.asarray(generator.get_output("logits"), dtype=np.float32)[0]

    def generate(
        self, prompt: str, adapter: str = BASE, max_new_tokens: int = 32
    ) -> dict[str, Any]:
        """Greedy text for ``prompt``: tokens, text and the time to the first new token."""
        ids = self.tokenizer.encode(prompt)
        start = time.perf_counter()
        generator = self.generator(adapter, max_length=len(ids) + max_new_tokens)
        generator.append_tokens(ids)
        generator.generate_next_token()
        first = time.perf_counter() - start
        while not generator.is_done():
            generator.generate_next_token()
        tokens = [int(t) for t in generator.get_sequence(0)]
        return {
            "adapter": adapter,
            "tokens": tokens[len(ids) :],
            "text": self.tokenizer.decode(generator.get_sequence(0)),
            "first_token_s": first,
        }


def rebuild(package: Path, name: str, out: Path) -> Path:
    """Regenerate adapter ``name``'s ``.onnx_adapter`` from its source (numpy, no torch).

    Raises:
        InputError: the adapter is not in the package or its source is not RS-LoRA v1.
    """
    from rslora_deploy.adapters.base import AdapterLoadOptions
    from rslora_deploy.adapters.rename import apply_renames
    from rslora_deploy.adapters.rslora_v1 import RsloraV1Format
    from rslora_deploy.exporters.genai import adapter_inputs as ai

    package = Path(package)
    records = {a["name"]: a for a in read_package_manifest(package)["adapters"]}
    if name not in records:
        raise _fail(f"adapter {name!r} is not in this package; it has: {', '.join(records)}")
    record = records[name]
    if record["format"] != RsloraV1Format.name:
        raise _fail(
            f"adapter {name!r} is {record['format']}; only an RS-LoRA v1 adapter is rebuilt from "
            "its seed checkpoint (ship its .onnx_adapter instead)"
        )
    inputs = json.loads((package / GRAPH_INPUTS).read_text(encoding="utf-8"))
    slots = ai.slots_from_json(inputs["slots"])
    contents = RsloraV1Format().load(package / record["source"], AdapterLoadOptions())
    apply_renames(contents.deltas, record.get("rename") or {})
    params = ai.adapter_parameters(name, contents.deltas, slots, np.dtype(inputs["dtype"]).type)
    ai.write_adapter_file(params, Path(out), int(inputs["model_version"]))
    return Path(out)


#: The pure-numpy modules the runner imports, copied into ``runner/rslora_deploy/`` as they are.
VENDORED = (
    "errors.py",
    "untrusted.py",
    "registry.py",
    "adapters/__init__.py",
    "adapters/base.py",
    "adapters/delta.py",
    "adapters/rename.py",
    "adapters/rsg.py",
    "adapters/rslora_v1.py",
    "adapters/st_io.py",
    "exporters/genai/adapter_inputs.py",
)
_STUB = '"""The part of rslora-deploy a multi-adapter package\'s runner needs (numpy only)."""\n'


def vendor_runner(runner_dir: Path) -> Path:
    """Write ``runner/run_adapters.py`` and the modules it imports (:data:`VENDORED`).

    The package's ``__init__`` files are stubs: the real ones import the build pipeline
    (pydantic, the config), which a device does not need.
    """
    import shutil

    source = Path(__file__).resolve().parents[2]
    target = Path(runner_dir) / "rslora_deploy"
    for rel in VENDORED:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, target / rel)
    for stub in ("__init__.py", "exporters/__init__.py", "exporters/genai/__init__.py"):
        (target / stub).write_text(_STUB, encoding="utf-8")
    shutil.copy2(Path(__file__), Path(runner_dir) / "run_adapters.py")
    return Path(runner_dir) / "run_adapters.py"


def main(argv: list[str] | None = None) -> int:
    """``run`` or ``rebuild`` (module doc); prints one JSON line."""
    parser = argparse.ArgumentParser(prog="run_adapters", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate with one adapter (or 'base')")
    run.add_argument("package", type=Path)
    run.add_argument("--adapter", default=BASE)
    run.add_argument("--adapter-file", type=Path, default=None)
    run.add_argument("--prompt", default="The capital of France is")
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--model-dir", type=Path, default=None)
    again = sub.add_parser("rebuild", help="regenerate an RS-LoRA adapter's file from its seeds")
    again.add_argument("package", type=Path)
    again.add_argument("name")
    again.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    from rslora_deploy.errors import RsloraDeployError

    try:
        if args.command == "rebuild":
            sys.stdout.write(
                json.dumps({"rebuilt": str(rebuild(args.package, args.name, args.out))}) + "\n"
            )
            return 0
        runner = AdapterPackage(args.package, args.model_dir)
        if args.adapter_file is not None:
            runner.load(args.adapter, args.adapter_file)
        result = runner.generate(args.prompt, args.adapter, args.max_new_tokens)
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    except RsloraDeployError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1


if __name__ == "__main__":
    # Shipped as runner/run_adapters.py: the vendored package beside it comes first on the path.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
