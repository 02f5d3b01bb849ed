"""``rslora-deploy budget``: estimate, measure, solve and draw a package's or a model's memory.

    budget PACKAGE_OR_MODEL --profile NAME|all [--max-length N] [--batch N]
           [--measure] [--solve] [--html PATH] [--bits B --group-size G]

A package (or onnxruntime-genai folder) is priced from its files (weights measured on disk, its
max_length and logits layout read from it); a Hugging Face model or a bare ``config.json`` folder
is predicted before quantizing (no weights loaded). ``--profile all`` checks every shipped
profile in one table. Exit 3 when nothing asked for fits.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from rslora_deploy.cli._errors import EXIT_OVER_BUDGET
from rslora_deploy.cli._output import OutputFormat


@dataclass(frozen=True)
class Target:
    """What is being priced: a built folder (``onnx_dir`` set) or a model config."""

    path: Path
    view: Any
    onnx_dir: Path | None
    package: Path | None
    layout_bits: int
    layout_group: int
    lm_head_int4: bool


def resolve_target(path: Path, bits: int, group_size: int) -> Target:
    """Classify ``path`` as package, onnxruntime-genai folder or model config.

    Raises:
        InputError: none of the three.
    """
    from rslora_deploy.errors import InputError
    from rslora_deploy.model_view import model_view, view_from_genai

    onnx_dir = path / "model" if (path / "model" / "genai_config.json").is_file() else path
    if (onnx_dir / "genai_config.json").is_file():
        package = path if (path / "manifest.json").is_file() else None
        quant, lm_int4 = _package_layout(package, bits, group_size)
        view = (
            model_view(onnx_dir)
            if (onnx_dir / "config.json").is_file()
            else view_from_genai(onnx_dir)
        )
        return Target(path, view, onnx_dir, package, quant[0], quant[1], lm_int4)
    if (path / "config.json").is_file():
        return Target(path, model_view(path), None, None, bits, group_size, False)
    raise InputError(
        f"{path} is neither a package, an onnxruntime-genai folder nor a Hugging Face model "
        "directory (config.json); pass the output of `rslora-deploy build` or a model"
    )


def _package_layout(package: Path | None, bits: int, group: int) -> tuple[tuple[int, int], bool]:
    if package is None:
        return (bits, group), False
    manifest = json.loads((package / "manifest.json").read_text(encoding="utf-8"))
    quant = manifest.get("quantization") or {}
    export = manifest.get("export") or {}
    return (
        (int(quant.get("bits", bits)), int(quant.get("group_size", group))),
        export.get("lm_head") == "int4",
    )


def price(
    target: Target, profile: Any, max_length: int | None, batch: int | None
) -> tuple[dict[str, Any], Any, Any]:
    """(budget report, solver layout, shape) of ``target`` on ``profile``."""
    from rslora_deploy.memory.estimate import (
        estimate_from_weights,
        package_shape,
        predict,
        weight_bytes,
    )
    from rslora_deploy.memory.solver import Layout, validate_shape

    if target.onnx_dir is not None:
        shape = package_shape(target.onnx_dir, profile)
        weights = weight_bytes(target.onnx_dir)
        source = "measured: bytes of the exported ONNX files"
        int4_head = target.lm_head_int4
    else:
        # A config is priced as the profile's exporter would ship it with default settings (the
        # int4 head on CPU targets, fp16 weights on Ascend), not as one fixed layout.
        predicted, shape = predict(target.view, profile, target.layout_bits, target.layout_group)
        weights = sum(predicted.values())
        layout_name = "default layout" if shape.float_lm_head else "default layout, int4 lm_head"
        source = (
            f"predicted for int{target.layout_bits} g{target.layout_group}, {layout_name}: "
            f"{predicted}"
        )
        int4_head = not shape.float_lm_head
    shape = replace(shape, max_length=max_length or shape.max_length, batch=batch or shape.batch)
    validate_shape(target.view, shape)
    report = estimate_from_weights(weights, target.view, profile, shape)
    report["weights_source"] = source
    layout = Layout(weights, target.layout_bits, target.layout_group, int4_head)
    return report, layout, shape


def _table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    from rslora_deploy.memory.html import TERMS

    table = Table(title="memory estimate (MiB)")
    # Only the terms some row charges: a column of zeros (a prepack no profile has) is noise.
    terms = [t for t in TERMS if any(r["estimate"]["terms_bytes"].get(t) for r in rows)]
    for column in ("profile", *terms, "total", "budget", "measured", "fits"):
        table.add_column(column, justify="left" if column == "profile" else "right")
    for row in rows:
        report, measured = row["estimate"], row.get("measured") or {}
        peak = (measured.get("probes_bytes") or {}).get("worst_case_peak")
        table.add_row(
            report["profile"],
            *(f"{report['terms_bytes'].get(t, 0) / 2**20:.1f}" for t in terms),
            f"{report['estimate_bytes'] / 2**20:.1f}",
            f"{report['budget_bytes'] / 2**20:.0f}",
            f"{peak / 2**20:.1f}" if peak else measured.get("status", "-"),
            "yes" if report["fits"] else "[bold red]NO[/bold red]",
        )
    return table


def _print_text(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console

    console = Console(file=sys.stdout, width=160)
    console.print(_table(rows))
    for row in rows:
        if "solver" in row:
            _print_solver(console, row["solver"])


def _print_solver(console: Any, answer: dict[str, Any]) -> None:
    from rslora_deploy.memory.solver import summary

    console.print(f"{answer['profile']}: {summary(answer)}")
    for change in answer["changes"]:
        verdict = "fits" if change["fits"] else "still over"
        console.print(
            f"  {change['change']:55s} {change['total_bytes'] / 2**20:8.1f} MiB  {verdict}"
        )


def _measure(target: Target, profile: Any, report: dict[str, Any], shape: Any) -> dict[str, Any]:
    from rslora_deploy.errors import InputError
    from rslora_deploy.memory.measure import measure_package, require_device

    if target.onnx_dir is None:
        raise InputError(
            f"--measure runs a built package; {target.path} is a model config. Build it first "
            "(rslora-deploy build) or drop --measure"
        )
    require_device(profile.device.value)
    return measure_package(target.onnx_dir, profile, max_length=shape.max_length)


def _write_reports(target: Target, rows: list[dict[str, Any]], html_path: Path | None) -> None:
    """budget.measured.json (+ budget.html) into the package's reports/, manifest refreshed."""
    from rslora_deploy.memory import html
    from rslora_deploy.memory.measure import write_measured
    from rslora_deploy.stages.package import record_files

    written: list[Path] = []
    measured = [r for r in rows if r.get("measured")]
    reports = (target.package or target.path) / "reports"
    if measured:
        written.append(write_measured(reports, measured[0]["measured"], measured[0]["estimate"]))
        html_path = html_path or reports / "budget.html"
    if html_path is not None:
        title = f"Memory budget: {target.path.name}"
        written.append(html.write(html_path, rows, title))
    if target.package is not None:
        root = target.package.resolve()
        inside = [p for p in written if p.resolve().is_relative_to(root)]
        if inside:
            record_files(target.package, inside)


def register(app: typer.Typer) -> None:
    """Add the ``budget`` command to ``app``."""

    @app.command()
    def budget(
        path: Annotated[
            Path | None,
            typer.Argument(help="A package, an ONNX folder, or a HF model / config.json dir."),
        ] = None,
        profile: Annotated[
            str, typer.Option(help="Profile name, .toml path, or 'all' (every shipped profile).")
        ] = "",
        model: Annotated[
            Path | None, typer.Option(help="Same as PATH (a model or config.json folder).")
        ] = None,
        bits: Annotated[int, typer.Option(help="Prediction: weight bits.")] = 4,
        group_size: Annotated[int, typer.Option(help="Prediction: group size.")] = 64,
        max_length: Annotated[
            int | None, typer.Option(help="Price this context length (default: the package's).")
        ] = None,
        batch: Annotated[int | None, typer.Option(help="Price this batch size.")] = None,
        measure: Annotated[
            bool, typer.Option("--measure", help="Run the worst case on the device and compare.")
        ] = False,
        solve: Annotated[
            bool, typer.Option("--solve", help="Largest max_length / batch that fits; fixes.")
        ] = False,
        html_out: Annotated[
            Path | None, typer.Option("--html", help="Write the HTML report here.")
        ] = None,
        fmt: Annotated[
            OutputFormat, typer.Option("--format", help="text or json.")
        ] = OutputFormat.TEXT,
    ) -> None:
        """Memory estimate against profiles (a package or a predicted model); --solve, --measure."""
        rows = run_budget(
            path or model, profile, bits, group_size, max_length, batch, measure, solve
        )
        if measure or html_out is not None:
            target = resolve_target(Path(str(path or model)), bits, group_size)
            _write_reports(target, rows, html_out)
        if fmt is OutputFormat.JSON:
            print(json.dumps(rows[0] if len(rows) == 1 else {"profiles": rows}, indent=2))
        else:
            _print_text(rows)
        if not any(row["estimate"]["fits"] for row in rows):
            raise typer.Exit(EXIT_OVER_BUDGET)


def run_budget(
    path: Path | None,
    profile: str,
    bits: int,
    group_size: int,
    max_length: int | None,
    batch: int | None,
    measure: bool,
    solve: bool,
) -> list[dict[str, Any]]:
    """Every row of the command's answer: ``{"estimate", "measured"?, "solver"?}`` per profile.

    Raises:
        UsageError: no path or no profile, or --measure with --profile all.
        ConfigError: a non-positive size or a max_length above the model's context.
    """
    from rslora_deploy.errors import ConfigError, UsageError
    from rslora_deploy.memory.solver import solve as run_solver
    from rslora_deploy.profiles import list_profiles, load_profile

    if path is None or not profile:
        raise UsageError("budget needs PACKAGE_OR_MODEL (or --model) and --profile NAME|all")
    for name, value in (("max_length", max_length), ("batch", batch)):
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be a positive number, got {value}")
    if measure and profile == "all":
        raise UsageError("--measure runs on one device: pass one --profile, not 'all'")
    target = resolve_target(path, bits, group_size)
    profiles = list_profiles() if profile == "all" else [load_profile(profile)]
    rows = []
    for prof in profiles:
        report, layout, shape = price(target, prof, max_length, batch)
        row: dict[str, Any] = {"estimate": report}
        if measure:
            from rslora_deploy.memory.measure import compare

            row["measured"] = _measure(target, prof, report, shape)
            report["measured"] = compare(row["measured"], report)
        if solve or not report["fits"]:
            row["solver"] = run_solver(layout, target.view, prof, shape)
        rows.append(row)
    return rows
