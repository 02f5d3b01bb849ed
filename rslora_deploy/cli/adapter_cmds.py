"""CLI commands of the adapter area: ``merge`` and ``adapter inspect|convert|train``.

Every command that writes a directory writes it beside ``--out`` under a temporary name and renames
it into place only on success, so a failure leaves nothing at ``--out``. Errors are raised as
RsloraDeployError; the main app prints them as one line and exits 1.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from rslora_deploy._fsutil import atomic_new_dir
from rslora_deploy.cli._output import OutputFormat, emit
from rslora_deploy.config import MergeDtype
from rslora_deploy.errors import ConfigError, InputError


class _Target(str, Enum):
    PEFT_LORA = "peft-lora"


# Shared by ``merge`` and ``build``: spec 5.2 step 1's user rename map, parsed by
# rslora_deploy.adapters.rename.parse_rename_args.
RenameOption = Annotated[
    list[str] | None,
    typer.Option(
        "--rename",
        metavar="OLD=NEW",
        help="Rename the adapter's module-name prefix OLD to NEW before lookup in the base "
        "(repeatable; longest prefix wins; replaces a recipe's adapter.rename).",
    ),
]

# Spec 6.1 rejections: PEFT modules_to_save / trainable_token_indices are E070 unless allowed.
AllowOverridesOption = Annotated[
    bool,
    typer.Option(
        "--allow-full-module-overrides",
        help="Copy PEFT modules_to_save tensors and trainable_token_indices rows into the base "
        "(exact shape and dtype checks; E070 otherwise).",
    ),
]


def _default_base(base: Path | None) -> Path:
    if base is not None:
        return base
    from rslora_deploy.data.assets import default_base_dir

    return default_base_dir()


def merge(
    out: Annotated[Path, typer.Option(help="Directory to write (must not exist or be empty).")],
    base: Annotated[
        Path | None, typer.Option(help="Base HF model dir (default: SmolLM2-135M).")
    ] = None,
    adapter: Annotated[
        Path | None,
        typer.Option(help="RS-LoRA v1, PEFT LoRA or PEFT VeRA dir (default: the demo adapter)."),
    ] = None,
    dtype: Annotated[
        MergeDtype, typer.Option(help="Merged weights' dtype (auto keeps the base's).")
    ] = MergeDtype.FLOAT32,
    untie: Annotated[
        bool, typer.Option(help="Untie embedding/lm_head to merge into them.")
    ] = False,
    allow_base_mismatch: Annotated[bool, typer.Option(help="Downgrade E010 to a warning.")] = False,
    allow_unverified_vera_regeneration: Annotated[
        bool, typer.Option(help="Regenerate VeRA projections saved with save_projection=False.")
    ] = False,
    rename: RenameOption = None,
    allow_full_module_overrides: AllowOverridesOption = False,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="text or json.")
    ] = OutputFormat.TEXT,
) -> None:
    """Merge an adapter into a base model and write a plain HF directory + merge_report.json."""
    from rslora_deploy.adapters import demo_adapter_dir
    from rslora_deploy.adapters.rename import parse_rename_args
    from rslora_deploy.config import AdapterConfig, MergeConfig
    from rslora_deploy.stages.merge import merge_adapter

    base_dir, base_quantization = _default_base(base), None
    if base is not None:  # a bitsandbytes 4-bit (QLoRA) base merges into its dequantized Wq
        from rslora_deploy.stages.load import dequantize_if_bnb4

        base_dir, base_quantization = dequantize_if_bnb4(Path(base_dir), check=True)
    adapter_dir = adapter if adapter is not None else demo_adapter_dir()
    merge_cfg = MergeConfig(dtype=dtype, untie=untie)
    adapter_cfg = AdapterConfig(
        path=adapter_dir,
        allow_base_mismatch=allow_base_mismatch,
        allow_unverified_vera_regeneration=allow_unverified_vera_regeneration,
        rename=parse_rename_args(rename),
        allow_full_module_overrides=allow_full_module_overrides,
    )
    with atomic_new_dir(out) as staging:
        artifact = merge_adapter(
            base_dir, adapter_dir, staging, merge_cfg, adapter_cfg, base_quantization
        )
    data = {"out": str(out), **artifact.meta}
    emit(
        data,
        fmt,
        f"merged {artifact.meta['adapter']['format']} adapter "
        f"({artifact.meta['adapter']['modules']} modules) into {base_dir} -> {out} "
        f"[{artifact.meta['dtype']}; max relative merge error "
        f"{artifact.meta['max_relative_merge_error']:.3g}]",
    )


adapter_app = typer.Typer(help="Inspect, convert and train adapters.", no_args_is_help=True)


@adapter_app.command("inspect")
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="Adapter directory.")],
    allow_unverified_vera_regeneration: Annotated[bool, typer.Option(hidden=True)] = False,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="text or json.")
    ] = OutputFormat.TEXT,
) -> None:
    """Format, modules, r, k, trainable parameters, projection mode and checksum status."""
    from rslora_deploy.adapters.detect import load_adapter

    adapter = load_adapter(path)
    meta = adapter.meta
    modules = [
        {
            "name": d.name,
            "d_out": d.d_out,
            "d_in": d.d_in,
            "layout": d.layout,
            "rank": d.rank,
            "scale": d.scale,
            "out_slice": list(d.out_slice) if d.out_slice else None,
            "dora": d.magnitude is not None,
        }
        for d in adapter.deltas
    ]
    lines = [
        f"format: {meta['format']}",
        f"modules: {meta['modules']}",
        f"r: {meta.get('r')}",
        f"k: {meta.get('k', '-')}",
        f"trainable parameters: {meta.get('trainable_parameters')}",
    ]
    if "projection" in meta:
        proj = meta["projection"]
        lines.append(
            f"projection: {proj['storage']} mode, generator {proj['generator']}, "
            f"seed {proj['seed']}, sharing {proj['sharing']}, "
            f"normalization {proj['normalization']}"
        )
    lines.append(f"checksums: {meta['checksums']}")
    lines.extend(
        f"  {m['name']}  {m['d_out']}x{m['d_in']}  {m['layout'] or 'auto'}"
        + ("  DoRA magnitude" if m["dora"] else "")
        for m in modules[:50]
    )
    if len(modules) > 50:
        lines.append(f"  ... {len(modules) - 50} more")
    emit({**meta, "module_list": modules}, fmt, "\n".join(lines))


@adapter_app.command("convert")
def convert_cmd(
    path: Annotated[Path, typer.Argument(help="RS-LoRA v1 adapter directory.")],
    out: Annotated[Path, typer.Option(help="Directory to write.")],
    to: Annotated[_Target, typer.Option(help="Target format.")] = _Target.PEFT_LORA,
) -> None:
    """Export an RS-LoRA adapter as plain PEFT LoRA, exactly (lora_B = s*B~, alpha = r)."""
    from rslora_deploy.adapters.convert import to_peft_lora
    from rslora_deploy.adapters.detect import detect_format

    fmt = detect_format(path)
    if fmt != "rslora-v1":
        raise ConfigError(f"{path} is {fmt}; convert reads RS-LoRA v1 adapters only")
    with atomic_new_dir(out) as staging:
        summary = to_peft_lora(path, staging)
    print(f"wrote PEFT LoRA adapter ({summary['modules']} modules, r={summary['r']}) to {out}")


def _texts(data: str) -> list[str]:
    if data.startswith("brown:"):
        from rslora_deploy.data.corpus import iter_documents

        texts = [d.text for d in iter_documents("calibration", genre=data.split(":", 1)[1])]
        if not texts:
            raise ConfigError(f"--data {data}: no calibration documents of that genre")
        return texts
    path = Path(data)
    if not path.is_file():
        raise InputError(f"--data {data} is neither a file nor brown:GENRE")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"--data {path}: every line must be JSON with a 'text' field ({exc})"
            ) from None
    return [t for t in raw.split("\n\n") if t.strip()]


@adapter_app.command("train")
def train_cmd(
    out: Annotated[Path, typer.Option(help="Directory to write the RS-LoRA v1 checkpoint to.")],
    data: Annotated[
        str, typer.Option(help="Text: .txt (blank-line separated), .jsonl, or brown:GENRE.")
    ],
    base: Annotated[Path | None, typer.Option(help="Base HF model dir.")] = None,
    r: Annotated[int, typer.Option(min=1)] = 64,
    k: Annotated[int, typer.Option(min=1)] = 8,
    steps: Annotated[int, typer.Option(min=1)] = 100,
    lr: Annotated[float, typer.Option(min=0)] = 0.05,
    seq_len: Annotated[int, typer.Option(min=8)] = 128,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    task_id: Annotated[str, typer.Option(help="Enters the projection keys.")] = "",
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
) -> None:
    """Train only the v vectors of RS-LoRA modules on attention and MLP projections."""
    from rslora_deploy.adapters.training import TrainConfig, train_adapter

    cfg = TrainConfig(
        r=r,
        k=k,
        steps=steps,
        lr=lr,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        task_id=task_id,
        threads=threads,
    )
    texts = _texts(data)
    with atomic_new_dir(out) as staging:
        summary = train_adapter(_default_base(base), texts, staging, cfg)
    print(json.dumps({"out": str(out), **summary}, indent=2))


def register(app: typer.Typer) -> None:
    """Attach ``merge`` and the ``adapter`` sub-app to the main app."""
    app.command("merge")(merge)
    app.add_typer(adapter_app, name="adapter")
