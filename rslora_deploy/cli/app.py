"""The ``rslora-deploy`` command line: a thin shell that parses flags into config and calls the API.

Results go to stdout (``--format json`` for machines); logs and progress go to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from rslora_deploy._fsutil import staged_output, write_json
from rslora_deploy.cli import adapter_cmds, budget_cmd, cache_cmds, quantize_cmds
from rslora_deploy.cli._errors import EXIT_OVER_BUDGET, EXIT_USAGE, report
from rslora_deploy.cli._output import OutputFormat, emit

app = typer.Typer(
    name="rslora-deploy",
    help="Merge an RS-LoRA/LoRA/VeRA adapter, quantize to 4 bits, export ONNX, check an edge "
    "device's memory budget, package.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
profiles_app = typer.Typer(help="Device profiles.", no_args_is_help=True)
assets_app = typer.Typer(
    help="Default model and corpus (fetched from package registries).", no_args_is_help=True
)
app.add_typer(profiles_app, name="profiles")
app.add_typer(assets_app, name="assets")


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("rslora_deploy")
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Backends (gptqmodel) install root handlers; without this every line would print twice.
    root.propagate = False


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings only.")] = False,
) -> None:
    _setup_logging(verbose)
    if quiet:
        logging.getLogger("rslora_deploy").setLevel(logging.WARNING)


def _adapter_args(values: list[str]) -> tuple[Path | None, list[dict[str, str]]]:
    """``--adapter`` values: one plain DIR (merged) or NAME=DIR each (run-time adapters).

    Raises:
        UsageError: a mix of both forms, or several plain directories.
    """
    import re

    from rslora_deploy.errors import UsageError

    named, plain = [], []
    for value in values:
        name, eq, path = value.partition("=")
        # NAME=DIR when the part before '=' is no path (the config then checks the name itself).
        if eq and name and not re.search(r"[/\\.~]", name):
            named.append({"name": name, "path": path})
        else:
            plain.append(value)
    if plain and (named or len(plain) > 1):
        raise UsageError(
            "--adapter takes one DIR (merged into the base) or NAME=DIR for each of several "
            f"run-time adapters, not both; got {values}"
        )
    return (Path(plain[0]) if plain else None), named


@app.command()
def build(
    profile: Annotated[str, typer.Option(help="Device profile name or .toml path.")],
    base: Annotated[
        Path | None, typer.Option(help="HF model dir or .gguf (default: SmolLM2-135M).")
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            help="Adapter dir to merge (default: demo adapter); NAME=DIR, repeated, ships several "
            "unmerged over one base, switched at run time."
        ),
    ] = None,
    no_adapter: Annotated[
        bool, typer.Option("--no-adapter", help="Deploy the base as it is.")
    ] = False,
    method: Annotated[str | None, typer.Option(help=quantize_cmds.field_help("method"))] = None,
    group_size: Annotated[
        int | None, typer.Option(help=quantize_cmds.field_help("group_size"))
    ] = None,
    lm_head: Annotated[
        str | None,
        typer.Option(
            help="lm_head/embedding precision: auto, int4, int8, fp32 (cpu), fp16 (cuda)."
        ),
    ] = None,
    calib: Annotated[Path | None, typer.Option(help=quantize_cmds.field_help("calib_path"))] = None,
    recipe: Annotated[Path | None, typer.Option(help="Recipe TOML (BuildConfig sections).")] = None,
    out: Annotated[Path | None, typer.Option(help="Package directory to write.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing package at --out.")] = False,
    protect_adapter: Annotated[
        bool,
        typer.Option(
            "--protect-adapter", help="Keep modules where int4 would erase the adapter at 8 bits."
        ),
    ] = False,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip perplexity evaluation.")] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Run every stage; read and write no stage cache.")
    ] = False,
    archive: Annotated[
        bool, typer.Option("--archive", help="Also write <out>.tar.gz (reproducible bytes).")
    ] = False,
    rename: adapter_cmds.RenameOption = None,
    allow_full_module_overrides: adapter_cmds.AllowOverridesOption = False,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="text or json.")
    ] = OutputFormat.TEXT,
) -> None:
    """Build a quantized, verified, budget-checked ONNX package."""
    from rslora_deploy.adapters.rename import parse_rename_args
    from rslora_deploy.api import build as run_build
    from rslora_deploy.config import apply_overrides, load_recipe, make_config

    merged_path, named = _adapter_args(adapter or [])
    overrides = {
        "profile": profile, "base": base, "out": out, "overwrite": overwrite or None,
        "adapter.path": merged_path, "adapter.use_demo_adapter": False if no_adapter else None,
        "adapters": named or None,
        "quantize.method": method, "quantize.group_size": group_size, "quantize.calib_path": calib,
        "export.lm_head": lm_head,
        "quantize.protect_adapter": True if protect_adapter else None,
        "eval.enabled": False if no_eval else None,
        "adapter.rename": parse_rename_args(rename) if rename else None,
        "adapter.allow_full_module_overrides": True if allow_full_module_overrides else None,
    }  # fmt: skip
    config = (
        load_recipe(recipe, **overrides) if recipe else make_config(apply_overrides({}, overrides))
    )
    archive_path = _archive_target(config.out, config.overwrite) if archive else None
    result = run_build(config, on_stage=_stage_printer(fmt), cache=not no_cache)
    budget = result.budget
    if archive_path is not None:
        from rslora_deploy.archive import write_archive

        write_archive(result.package_dir, archive_path)
    text = (
        f"package: {result.package_dir}\n"
        + (f"archive: {archive_path}\n" if archive_path else "")
        + f"memory estimate {budget.estimate_bytes / 2**20:.1f} MiB of "
        f"{budget.budget_bytes / 2**20:.0f} MiB ({config.profile}): "
        f"{'fits' if result.fits else 'OVER BUDGET'}"
    )
    if budget.solver_summary:
        text += f"\n{budget.solver_summary} (reports/budget.json: solver)"
    quality = result.manifest.get("quality") or {}
    warning = quality.get("adapter_survival_warning")
    if warning:
        # Loud on purpose: the package works, but may behave like the base model.
        retained = quality.get("adapter_survival_retained")
        warning = f"adapter survival {retained} is {warning}"
        text += f"\nWARNING: {warning}"
    payload = {"package": str(result.package_dir), "budget": budget.to_json(), "warning": warning}
    if archive_path is not None:
        payload["archive"] = str(archive_path)
    emit(payload, fmt, text)
    if not result.fits:
        raise typer.Exit(EXIT_OVER_BUDGET)


def _archive_target(out: Path, overwrite: bool) -> Path:
    """``<out>.tar.gz``, refused up front (before any work) if it exists and not ``overwrite``."""
    from rslora_deploy.archive import default_archive_path
    from rslora_deploy.errors import ConfigError

    path = default_archive_path(out)
    if path.exists() and not overwrite:
        raise ConfigError(f"archive {path} already exists; pass --overwrite or another --out")
    return path


def _stage_printer(fmt: OutputFormat) -> Any:
    if fmt is OutputFormat.JSON or not sys.stderr.isatty():
        return None
    from rich.console import Console

    console = Console(stderr=True)
    status: dict[str, Any] = {}

    def on_stage(name: str, event: str) -> None:
        if event == "start":
            status["s"] = console.status(f"[bold]{name}[/bold] ...")
            status["s"].start()
        elif "s" in status:
            status["s"].stop()
            console.print(f"[green]done[/green] {name}")

    return on_stage


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="Quantized HF checkpoint (GPTQ/AWQ).")],
    out: Annotated[Path, typer.Option(help="Output folder for the ONNX model.")],
    profile: Annotated[str, typer.Option(help="Profile (sets exporter and target).")] = "t4-2gb",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Export a quantized checkpoint with the profile's exporter."""
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.errors import InputError
    from rslora_deploy.exporters import get_exporter
    from rslora_deploy.profiles import load_profile

    prof = load_profile(profile)
    exporter = get_exporter(prof.exporter)
    if not (model / "config.json").is_file():
        raise InputError(f"{model} has no config.json; pass a quantized Hugging Face checkpoint")
    with staged_output(out, overwrite) as staging:
        exporter.export(
            Artifact("hf-quantized", model),
            staging,
            exporter.config_class(),
            prof,
            staging.parent / f".{staging.name}.log",
        )
        (staging.parent / f".{staging.name}.log").unlink(missing_ok=True)
    print(out)


@app.command()
def lint(
    package: Annotated[
        Path, typer.Argument(help="Package (or its model/) from an ascend-om build.")
    ],
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="text or json.")
    ] = OutputFormat.TEXT,
) -> None:
    """Op lint of an Ascend package: every node NPU-runnable, static per gear (exit 1 if not)."""
    from rslora_deploy.exporters.ascend.op_lint import lint_package, raise_on_errors

    result = lint_package(package)
    data = result.to_dict()
    text = (
        f"{data['nodes']} nodes, opset {data['opset']}, IR {data['ir_version']}: "
        f"{'passed' if data['passed'] else 'FAILED'} ({len(data['errors'])} errors, "
        f"{len(data['warnings'])} warnings, {data['seconds']} s); gears static: "
        + ", ".join(f"{g}={v['static']}" for g, v in data["gears"].items())
    )
    emit(data, fmt, text)
    raise_on_errors(result)


@app.command()
def verify(
    package: Annotated[
        Path, typer.Argument(help="Package directory or .tar.gz archive written by build.")
    ],
    generate: Annotated[bool, typer.Option(help="Also load the model and generate.")] = True,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="text or json.")
    ] = OutputFormat.TEXT,
) -> None:
    """Re-hash a package (or archive) against its manifest and run a generation smoke test."""
    import tempfile

    from rslora_deploy.archive import extract_archive, is_archive

    if is_archive(package) or package.is_file():
        # Extracted member by member with every check, into a directory removed afterwards.
        with tempfile.TemporaryDirectory(prefix="rslora-deploy-verify-") as tmp:
            root = extract_archive(package, Path(tmp) / "package")
            result = _verify_package(root, generate, package)
    else:
        result = _verify_package(package, generate, package)
    text = f"manifest ok ({package})"
    if generate:
        text += f"\n{result['smoke_test']['text']}"
    emit(result, fmt, text)


def _verify_package(root: Path, generate: bool, label: Path) -> dict[str, Any]:
    """Manifest check (and smoke test) of the package directory ``root``, reported as ``label``."""
    import tempfile

    from rslora_deploy.errors import ExportValidationError, InputError
    from rslora_deploy.exporters import get_exporter
    from rslora_deploy.profiles import DeviceProfile
    from rslora_deploy.stages.package import MANIFEST, check_model_paths, verify_manifest

    if not (root / MANIFEST).is_file():
        raise InputError(f"{label} has no {MANIFEST}; pass a package written by `build`")
    problems = verify_manifest(root)
    if problems:
        raise ExportValidationError(
            f"package {label} fails its manifest: {'; '.join(problems[:5])}; rebuild it or "
            "fetch an intact copy"
        )
    check_model_paths(root)
    result: dict[str, Any] = {"package": str(label), "manifest": "ok"}
    manifest = json.loads((root / MANIFEST).read_text())
    if manifest.get("adapters"):
        exporter = get_exporter(DeviceProfile.model_validate(manifest["profile"]).exporter)
        result["adapters"] = {
            record["name"]: exporter.check_runtime_adapter(
                root / "model", root / record["file"], record["name"]
            )
            for record in manifest["adapters"]
        }
    if generate:
        prof = DeviceProfile.model_validate(manifest["profile"])
        with tempfile.TemporaryDirectory() as tmp:
            smoke = get_exporter(prof.exporter).smoke_test(root / "model", prof, Path(tmp))
        result["smoke_test"] = smoke
    return result


@app.command()
def run(
    package: Annotated[Path, typer.Argument(help="A multi-adapter package written by build.")],
    adapter: Annotated[
        str, typer.Option(help="The package's adapter to activate, or 'base' for none.")
    ] = "base",
    prompt: Annotated[str, typer.Option(help="Prompt text.")] = "The capital of France is",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 32,
    adapter_file: Annotated[
        Path | None,
        typer.Option(help="Load this .onnx_adapter as --adapter instead of the package's file."),
    ] = None,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="text or json.")
    ] = OutputFormat.TEXT,
) -> None:
    """Generate greedily with one of a multi-adapter package's adapters (or the base)."""
    import tempfile

    from rslora_deploy.exporters.genai.adapter_runner import AdapterPackage, read_package_manifest
    from rslora_deploy.profiles import DeviceProfile

    manifest = read_package_manifest(package)
    prof = DeviceProfile.model_validate(manifest["profile"])
    with tempfile.TemporaryDirectory(prefix="rslora-deploy-run-") as tmp:
        model_dir = _runnable_here(package / "model", prof, Path(tmp))
        runner = AdapterPackage(package, model_dir)
        if adapter_file is not None:
            runner.load(adapter, adapter_file)
        result = runner.generate(prompt, adapter, max_new_tokens)
    emit(result, fmt, result["text"])


def _runnable_here(model_dir: Path, prof: Any, work: Path) -> Path:
    """The package's graph, or its CPU view on a machine whose onnxruntime has no CUDA provider."""
    import onnxruntime as ort

    from rslora_deploy.exporters import get_exporter

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return model_dir
    return get_exporter(prof.exporter).cpu_runnable(model_dir, prof, work)


@app.command()
def package(
    model: Annotated[
        Path | None, typer.Option(help="An onnxruntime-genai model folder (from export).")
    ] = None,
    profile: Annotated[str | None, typer.Option(help="Device profile name or .toml path.")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Package directory (or, with --archive, .tar.gz) to write.")
    ] = None,
    archive: Annotated[
        Path | None,
        typer.Option(help="Write this existing package as one reproducible .tar.gz instead."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="text or json.")
    ] = OutputFormat.TEXT,
) -> None:
    """Package an exported ONNX folder (smoke test, budget, manifest, model card), or archive one.

    ``--archive PACKAGE`` writes ``PACKAGE.tar.gz`` (or ``--out``); the package is re-hashed
    against its manifest first.
    """
    if archive is not None:
        _archive_command(archive, out, overwrite, fmt)
        return
    if model is None or profile is None or out is None:
        from rslora_deploy.errors import UsageError

        raise UsageError("package needs --model, --profile and --out (or --archive PACKAGE)")
    _package_model(model, profile, out, overwrite, fmt)


def _archive_command(package: Path, out: Path | None, overwrite: bool, fmt: OutputFormat) -> None:
    from rslora_deploy.archive import default_archive_path, write_archive
    from rslora_deploy.errors import ConfigError, InputError

    if not package.is_dir():
        raise InputError(f"--archive {package} is not a package directory; pass a build's --out")
    target = out or default_archive_path(package)
    if target.exists() and not overwrite:
        raise ConfigError(f"archive {target} already exists; pass --overwrite or another --out")
    written = write_archive(package, target)
    emit({"archive": str(written)}, fmt, f"archive: {written}")


def _package_model(
    model: Path, profile: str, out: Path, overwrite: bool, fmt: OutputFormat
) -> None:
    import shutil
    import tempfile

    from rslora_deploy.errors import InputError
    from rslora_deploy.exporters import get_exporter
    from rslora_deploy.memory.report import finish_build_report
    from rslora_deploy.memory.solver import Layout
    from rslora_deploy.model_view import view_from_genai
    from rslora_deploy.profiles import load_profile
    from rslora_deploy.reports import BudgetReport, SmokeReport
    from rslora_deploy.stages.budget import estimate
    from rslora_deploy.stages.package import describe_dir, finish_package, manifest_body

    prof = load_profile(profile)
    exporter = get_exporter(prof.exporter)
    if not (model / "genai_config.json").is_file():
        raise InputError(
            f"{model} has no genai_config.json; pass the output of `rslora-deploy export`"
        )
    with staged_output(out, overwrite) as staging:
        shutil.copytree(model, staging / "model")
        with tempfile.TemporaryDirectory() as tmp:
            smoke = SmokeReport.model_validate(
                exporter.smoke_test(staging / "model", prof, Path(tmp))
            )
        view = view_from_genai(staging / "model")
        budget = estimate(staging / "model", view, prof)
        (staging / "reports").mkdir()
        layout = Layout(budget["terms_bytes"]["weights"])
        finish_build_report(staging / "model", view, prof, budget, staging / "reports", layout)
        result = BudgetReport.model_validate(budget)
        write_json(staging / "reports" / "budget.json", result.to_json())
        inputs = {"base": describe_dir(model, model.name), "adapter": None}
        finish_package(staging, manifest_body(prof, result, smoke, inputs))
    emit({"package": str(out), "budget": result.to_json()}, fmt, f"package: {out}")
    if not result.fits:
        raise typer.Exit(EXIT_OVER_BUDGET)


@profiles_app.command("list")
def profiles_list(
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="text or json.")
    ] = OutputFormat.TEXT,
) -> None:
    """List the device profiles."""
    from rslora_deploy.profiles import list_profiles

    profiles = list_profiles()
    emit(
        {"profiles": [p.model_dump(mode="json") for p in profiles]},
        fmt,
        "\n".join(f"{p.name:18s} {p.description}" for p in profiles),
    )


@profiles_app.command("show")
def profiles_show(name: Annotated[str, typer.Argument(help="Profile name or .toml path.")]) -> None:
    """Show one profile's fields."""
    from rslora_deploy.profiles import load_profile

    print(json.dumps(load_profile(name).model_dump(mode="json"), indent=2))


@assets_app.command("fetch")
def assets_fetch(
    force: Annotated[bool, typer.Option(help="Re-fetch and re-convert.")] = False,
) -> None:
    """Fetch and convert the default base model and corpus into the cache (idempotent)."""
    from rslora_deploy.data.assets import fetch_all

    for name, path in fetch_all(force).items():
        print(f"{name}: {path}")


adapter_cmds.register(app)
quantize_cmds.register(app)
cache_cmds.register(app)
budget_cmd.register(app)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, map errors to one line and an exit code."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    try:
        # standalone mode: typer prints usage errors itself and exits 2; anything else propagates.
        app(args=argv, standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except BaseException as exc:  # noqa: BLE001 - the one place every failure becomes one line
        return report(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
