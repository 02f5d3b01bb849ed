"""RS-LoRA v1 checkpoints: ``rslora_config.json`` + ``rslora_model.safetensors`` (spec 3-4).

Random-Subspace LoRA (NOLA-style; Koohpayegani et al., ICLR 2024, arXiv 2310.02556) per module:

    A~ = sum_l v_A[l] P~_A[l]  (r x d_in),   B~ = sum_l v_B[l] P~_B[l]  (d_out x r)
    dW = s * B~ A~,   s = sigma * nu^2,  sigma = alpha/r (or alpha/sqrt r),  nu = 1/sqrt k (or 1)

P~ is frozen: regenerated with RSG-1 (seed mode) or read from the file (stored mode), and checked
against its recorded SHA-256 before use. The reader validates everything it can without the base
model, so a bad adapter fails before the (slow) base load.

Our extension (docs/rslora-format.md, "DoRA magnitude"): a config with ``"dora": true`` carries one
trained magnitude ``{module}.rslora_magnitude`` [d_out] per module (dtype ``dtype.v``), and the
merge re-normalises the rows of W + dW to it (DoRA, arXiv 2402.09353). A reader without the
extension refuses such a file (E023, unexpected tensor) instead of merging it as plain LoRA.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from rslora_deploy.adapters import rsg
from rslora_deploy.adapters.base import AdapterContents, AdapterLoadOptions
from rslora_deploy.adapters.delta import LAYOUTS, ModuleDelta
from rslora_deploy.adapters.st_io import SafetensorsFile
from rslora_deploy.errors import (
    AdapterFormatError,
    ChecksumError,
    NonFiniteError,
    ShapeMismatchError,
)
from rslora_deploy.untrusted import MAX_JSON_BYTES, read_limited

logger = logging.getLogger(__name__)

FORMAT = "random_subspace_lora"
FORMAT_VERSION = 1
CONFIG_NAME = "rslora_config.json"
WEIGHTS_NAME = "rslora_model.safetensors"
SCALING_RULES = ("alpha_over_r", "alpha_over_sqrt_r")
NORMALIZATIONS = ("inv_sqrt_k", "none")
V_SHARING = ("per_module", "global", "grouped")
STORAGES = ("seed", "stored")
SHARINGS = ("per_module", "per_shape")
_V_DTYPES = {"float32": "F32", "float64": "F64"}
MAGNITUDE_SUFFIX = "rslora_magnitude"


def magnitude_name(module: str) -> str:
    """Tensor name of a module's DoRA magnitude (our extension of spec 4.2)."""
    return f"{module}.{MAGNITUDE_SUFFIX}"


def effective_scale(alpha: float, r: int, k: int, scaling_rule: str, normalization: str) -> float:
    """The merge scale s = sigma * nu^2 (spec 3.2).

    sigma = alpha/r (``alpha_over_r``) or alpha/sqrt(r); nu^2 = 1/k (``inv_sqrt_k``) or 1.
    """
    sigma = alpha / r if scaling_rule == "alpha_over_r" else alpha / math.sqrt(r)
    return sigma / k if normalization == "inv_sqrt_k" else sigma


def projection_key(sharing: str, module: str, d_out: int, d_in: int) -> str:
    """The name P~ is keyed by: the module path, or ``@shape:{d_out}x{d_in}`` when shared."""
    return f"@shape:{d_out}x{d_in}" if sharing == "per_shape" else module


def stored_p_names(sharing: str, pkey: str) -> tuple[str, str]:
    """Tensor names of a stored P~_A, P~_B (spec 4.2)."""
    if sharing == "per_shape":
        shape = pkey.removeprefix("@shape:")
        return f"rslora_P_shared.{shape}.A", f"rslora_P_shared.{shape}.B"
    return f"{pkey}.rslora_P_A", f"{pkey}.rslora_P_B"


@dataclass(frozen=True)
class ModuleEntry:
    """One ``modules[name]`` entry."""

    name: str
    d_in: int
    d_out: int
    layout: str
    out_slice: tuple[int, int] | None


@dataclass
class RsloraConfig:
    """The validated ``rslora_config.json`` (raw dict kept for round trips and reports)."""

    raw: dict[str, Any]
    raw_bytes: bytes
    modules: dict[str, ModuleEntry]
    r: int
    k: int
    scale: float
    v_sharing: str
    v_groups: dict[str, list[str]]
    v_ab_tied: bool
    storage: str
    generator: str
    seed: int | None
    sharing: str
    task_id: str
    dtype_v: str
    checksums: dict[str, dict[str, str]] = field(default_factory=dict)
    dora: bool = False
    """Every module carries a DoRA magnitude tensor (our extension; absent in the spec's v1)."""

    def pkey(self, entry: ModuleEntry) -> str:
        """P~ key of a module entry."""
        return projection_key(self.sharing, entry.name, entry.d_out, entry.d_in)

    def group_of(self, module: str) -> str:
        """Group name of a module in grouped v sharing."""
        for group, members in self.v_groups.items():
            if module in members:
                return group
        raise AdapterFormatError(f"module {module} is in no v_groups entry", code="E001")

    def v_names(self, module: str) -> tuple[str, str]:
        """Tensor names holding (v_A, v_B) of a module (equal names when v_ab_tied)."""
        if self.v_sharing == "per_module":
            prefix = f"{module}."
        elif self.v_sharing == "global":
            prefix = ""
        else:
            prefix = f"rslora_group.{self.group_of(module)}."
        if self.v_ab_tied:
            name = f"{prefix}v" if self.v_sharing == "grouped" else f"{prefix}rslora_v"
            return name, name
        if self.v_sharing == "grouped":
            return f"{prefix}v_A", f"{prefix}v_B"
        return f"{prefix}rslora_v_A", f"{prefix}rslora_v_B"

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name the safetensors file must hold, with its shape."""
        names: dict[str, tuple[int, ...]] = {}
        for entry in self.modules.values():
            for name in self.v_names(entry.name):
                names[name] = (self.k,)
            if self.storage == "stored":
                name_a, name_b = stored_p_names(self.sharing, self.pkey(entry))
                names[name_a] = (self.k, self.r, entry.d_in)
                names[name_b] = (self.k, entry.d_out, self.r)
            if self.dora:
                names[magnitude_name(entry.name)] = (entry.d_out,)
        return names

    def trainable_parameters(self) -> int:
        """Number of trained scalars (distinct v entries, plus DoRA magnitudes)."""
        count = len({n for e in self.modules.values() for n in self.v_names(e.name)}) * self.k
        return count + (sum(e.d_out for e in self.modules.values()) if self.dora else 0)


def _fail(msg: str, code: str = "E001") -> AdapterFormatError:
    return AdapterFormatError(msg, code=code)


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise _fail(f"{where}: required field {key!r} is missing; add it (spec 4.1)")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _fail(f"{where}: field {key!r} has type {type(value).__name__}, expected {kind}")
    return value


def _enum(obj: dict[str, Any], key: str, allowed: tuple[str, ...], where: str) -> str:
    value = _get(obj, key, str, where)
    if value not in allowed:
        raise _fail(f"{where}: {key}={value!r} is not one of {list(allowed)}")
    return str(value)


def _positive_int(obj: dict[str, Any], key: str, where: str) -> int:
    value = _get(obj, key, int, where)
    if value < 1:
        raise _fail(f"{where}: {key}={value}, expected an integer >= 1")
    return int(value)


def _parse_v_groups(
    cfg: dict[str, Any], modules: dict[str, Any], where: str
) -> dict[str, list[str]]:
    """``v_groups`` of a grouped config: every module in exactly one group (E001 otherwise)."""
    v_groups: dict[str, list[str]] = _get(cfg, "v_groups", dict, where)
    seen: dict[str, str] = {}
    for group, members in v_groups.items():
        if not isinstance(members, list):
            raise _fail(f"{where}: v_groups[{group!r}] must be a list of module names")
        for member in members:
            if member not in modules or member in seen:
                why = "not in modules" if member not in modules else f"also in {seen[member]!r}"
                raise _fail(f"{where}: v_groups[{group!r}] lists {member!r}, {why}")
            seen[member] = group
    if missing := sorted(set(modules) - set(seen)):
        raise _fail(f"{where}: modules {missing[:3]} are in no v_groups entry")
    return v_groups


def _checked_scale(cfg: dict[str, Any], r: int, k: int, where: str) -> float:
    """The scale from alpha, r, k and the rules, which must match ``effective_scale`` (E003)."""
    alpha = float(_get(cfg, "alpha", (int, float), where))
    scaling_rule = _enum(cfg, "scaling_rule", SCALING_RULES, where)
    proj = _get(cfg, "projection", dict, where)
    normalization = _enum(proj, "normalization", NORMALIZATIONS, f"{where}: projection")
    recorded = float(_get(cfg, "effective_scale", (int, float), where))
    scale = effective_scale(alpha, r, k, scaling_rule, normalization)
    if not math.isclose(recorded, scale, rel_tol=1e-12, abs_tol=0.0):
        raise AdapterFormatError(
            f"{where}: effective_scale={recorded!r} but alpha={alpha}, r={r}, k={k}, "
            f"{scaling_rule}, {normalization} give {scale!r}; fix effective_scale",
            code="E003",
        )
    return scale


def parse_config(raw_bytes: bytes, where: str = CONFIG_NAME) -> RsloraConfig:
    """Validate config bytes (E001, E003, E041, E022 for slices).

    Raises:
        AdapterFormatError: not JSON, unknown format/version, missing field, bad enum value.
    """
    try:
        cfg = json.loads(raw_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(f"{where} is not valid JSON ({exc}); fix or regenerate the file") from None
    if not isinstance(cfg, dict):
        raise _fail(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    fmt = cfg.get("format")
    if fmt != FORMAT:
        raise _fail(f"{where}: format={fmt!r}, expected {FORMAT!r}")
    version = cfg.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise _fail(
            f"{where}: format_version={version!r}, expected {FORMAT_VERSION}; "
            "this tool reads RS-LoRA v1 only"
        )
    base = _get(cfg, "base_model", dict, where)
    for key in ("name_or_path", "architecture", "config_sha256", "target_weights_sha256"):
        _get(base, key, str, f"{where}: base_model")
    task_id = _get(cfg, "task_id", str, where)
    r = _positive_int(cfg, "r", where)
    k = _positive_int(cfg, "k", where)
    scale = _checked_scale(cfg, r, k, where)
    proj = _get(cfg, "projection", dict, where)
    pwhere = f"{where}: projection"
    modules = _parse_modules(_get(cfg, "modules", dict, where), where)
    v_sharing = _enum(cfg, "v_sharing", V_SHARING, where)
    v_groups = _parse_v_groups(cfg, modules, where) if v_sharing == "grouped" else {}
    v_ab_tied = _get(cfg, "v_ab_tied", bool, where)
    storage = _enum(proj, "storage", STORAGES, pwhere)
    generator, seed = _parse_generator(proj, storage, pwhere)
    sharing = _enum(proj, "sharing", SHARINGS, pwhere)
    dtypes = _get(cfg, "dtype", dict, where)
    dtype_v = _enum(dtypes, "v", tuple(_V_DTYPES), f"{where}: dtype")
    _enum(dtypes, "P", ("float32",), f"{where}: dtype")
    checksums = _get(proj, "sha256", dict, pwhere)
    _get(proj, "sha256_all", str, pwhere)
    dora = _get(cfg, "dora", bool, where) if "dora" in cfg else False
    return RsloraConfig(
        raw=cfg,
        raw_bytes=raw_bytes,
        modules=modules,
        r=r,
        k=k,
        scale=scale,
        v_sharing=v_sharing,
        v_groups=v_groups,
        v_ab_tied=bool(v_ab_tied),
        storage=storage,
        generator=generator,
        seed=seed,
        sharing=sharing,
        task_id=task_id,
        dtype_v=dtype_v,
        checksums=checksums,
        dora=bool(dora),
    )


def _parse_modules(raw: dict[str, Any], where: str) -> dict[str, ModuleEntry]:
    if not raw:
        raise _fail(f"{where}: modules is empty; an adapter needs at least one target module")
    out = {}
    for name, spec in raw.items():
        mwhere = f"{where}: modules[{name!r}]"
        if not isinstance(spec, dict):
            raise _fail(f"{mwhere} must be an object")
        d_in = _positive_int(spec, "d_in", mwhere)
        d_out = _positive_int(spec, "d_out", mwhere)
        layout = _enum(spec, "layout", LAYOUTS, mwhere)
        out_slice = None
        if "out_slice" in spec:
            sl = spec["out_slice"]
            if not (
                isinstance(sl, list)
                and len(sl) == 2
                and all(isinstance(x, int) for x in sl)
                and 0 <= sl[0] < sl[1]
            ):
                raise ShapeMismatchError(
                    f"{mwhere}: out_slice={sl!r}, expected [start, stop] with 0 <= start < stop"
                )
            if sl[1] - sl[0] != d_out:
                raise ShapeMismatchError(
                    f"{mwhere}: out_slice {sl} has width {sl[1] - sl[0]} but d_out={d_out}; "
                    "d_out must be stop - start"
                )
            out_slice = (int(sl[0]), int(sl[1]))
        out[name] = ModuleEntry(name, d_in, d_out, layout, out_slice)
    return out


def _parse_generator(proj: dict[str, Any], storage: str, where: str) -> tuple[str, int | None]:
    gen = _get(proj, "generator", dict, where)
    name = gen.get("name")
    if name == "rsg" and gen.get("version") == 1:
        seed = proj.get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < rsg.MAX_SEED:
            raise _fail(f"{where}: seed={seed!r}, expected an integer in [0, 2**63)")
        return "rsg", int(seed)
    if name == "external":
        if storage == "seed":
            raise AdapterFormatError(
                f"{where}: generator 'external' with storage 'seed': external bases cannot be "
                "regenerated; store P~ (storage 'stored')",
                code="E041",
            )
        return "external", None
    raise AdapterFormatError(
        f"{where}: unknown generator {gen!r}, expected {{'name': 'rsg', 'version': 1}} or "
        "{'name': 'external'}",
        code="E041",
    )


@dataclass
class RsloraCheckpoint:
    """A validated checkpoint: config plus tensors (v, and P~ in stored mode)."""

    directory: Path
    config: RsloraConfig
    tensors: dict[str, np.ndarray]


def read_checkpoint(directory: Path) -> RsloraCheckpoint:
    """Read and validate everything that does not need the base model.

    Raises:
        AdapterFormatError: E001 (config), E002 (binding), E003 (scale), E023 (tensor set),
            E024 (dtype), E041 (generator); ShapeMismatchError (E022); NonFiniteError (E030).
    """
    directory = Path(directory)
    cfg_path, st_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (cfg_path, st_path):
        if not path.is_file():
            raise _fail(
                f"{directory}: {path.name} is missing; an RS-LoRA v1 checkpoint needs "
                f"{CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    raw = read_limited(cfg_path, MAX_JSON_BYTES, "adapter config", AdapterFormatError)
    cfg = parse_config(raw, str(cfg_path))
    handle = SafetensorsFile(st_path)
    meta = handle.metadata
    for key, want in (("format", FORMAT), ("format_version", str(FORMAT_VERSION))):
        if meta.get(key) != want:
            raise _fail(f"{st_path}: metadata {key}={meta.get(key)!r}, expected {want!r}")
    actual = hashlib.sha256(raw).hexdigest()
    if meta.get("config_sha256") != actual:
        raise ChecksumError(
            f"{st_path}: metadata config_sha256={meta.get('config_sha256')!r} but {CONFIG_NAME} "
            f"hashes to {actual}; the two files do not belong together (re-save both)",
            code="E002",
        )
    expected = cfg.expected_tensors()
    present = set(handle.keys())
    if missing := sorted(set(expected) - present):
        raise _fail(
            f"{st_path}: missing tensor {missing[0]!r} ({len(missing)} missing) required "
            f"by v_sharing={cfg.v_sharing}, storage={cfg.storage}",
            code="E023",
        )
    if extra := sorted(present - set(expected)):
        hint = (
            f'a DoRA magnitude needs "dora": true in {CONFIG_NAME}'
            if extra[0].endswith(f".{MAGNITUDE_SUFFIX}")
            else "remove it or fix the config"
        )
        raise _fail(
            f"{st_path}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected); {hint}",
            code="E023",
        )
    tensors = {
        name: _read_tensor(handle, name, shape, cfg.dtype_v, st_path)
        for name, shape in expected.items()
    }
    if cfg.dora:
        _check_magnitudes(cfg, tensors, st_path)
    _check_checksum_table(cfg, str(cfg_path))
    return RsloraCheckpoint(directory, cfg, tensors)


def _read_tensor(
    handle: SafetensorsFile, name: str, shape: tuple[int, ...], dtype_v: str, st_path: Path
) -> np.ndarray:
    """One checkpoint tensor after its dtype (E024), shape (E022) and finiteness (E030) checks.

    P tensors are always F32; v tensors have the config's ``dtype.v``.
    """
    is_p = ".rslora_P_" in name or name.startswith("rslora_P_shared.")
    want_dtype = "F32" if is_p else _V_DTYPES[dtype_v]
    if handle.dtype(name) != want_dtype:
        raise _fail(
            f"{st_path}: tensor {name!r} is {handle.dtype(name)}, expected "
            f"{want_dtype} (dtype.{'P' if is_p else 'v'}); F16/BF16 is not allowed "
            "in v1",
            code="E024",
        )
    if handle.shape(name) != shape:
        what = (
            " (one entry per output row, d_out of its module entry)"
            if name.endswith(f".{MAGNITUDE_SUFFIX}")
            else ""
        )
        raise ShapeMismatchError(
            f"{st_path}: tensor {name!r} has shape "
            f"{list(handle.shape(name))}, expected {list(shape)}{what}"
        )
    array = handle.numpy(name)
    if not np.all(np.isfinite(array)):
        raise NonFiniteError(
            f"{st_path}: tensor {name!r} contains NaN/Inf; the adapter is "
            "corrupted or training diverged"
        )
    return array


def _check_magnitudes(cfg: RsloraConfig, tensors: dict[str, np.ndarray], st_path: Path) -> None:
    """A DoRA magnitude is a row norm: a 0 entry would zero the row (E022, as for PEFT DoRA).

    Shape (E022), dtype (E024) and NaN/Inf (E030) were checked when the tensor was read.
    """
    for entry in cfg.modules.values():
        name = magnitude_name(entry.name)
        if zeros := int(np.sum(tensors[name] == 0)):
            raise ShapeMismatchError(
                f"{st_path}: tensor {name!r} has {zeros} zero entries; a trained DoRA magnitude "
                "is a row norm, never 0: the adapter file is damaged"
            )


def _check_checksum_table(cfg: RsloraConfig, where: str) -> None:
    keys = {cfg.pkey(e) for e in cfg.modules.values()}
    for key in sorted(keys):
        entry = cfg.checksums.get(key)
        if not isinstance(entry, dict) or not {"A", "B"} <= set(entry):
            raise ChecksumError(
                f"{where}: projection.sha256 has no A/B checksum for {key!r}", code="E040"
            )
    table = {key: {f: cfg.checksums[key][f] for f in ("A", "B")} for key in keys}
    aggregate = rsg.aggregate_sha256(table)
    if aggregate != cfg.raw["projection"]["sha256_all"]:
        raise ChecksumError(
            f"{where}: projection.sha256_all is {cfg.raw['projection']['sha256_all']}, the "
            f"per-tensor checksums aggregate to {aggregate}; the config was edited",
            code="E040",
        )


def _basis_slabs(ckpt: RsloraCheckpoint, entry: ModuleEntry, factor: str) -> Any:
    cfg = ckpt.config
    rows, cols = (cfg.r, entry.d_in) if factor == "A" else (entry.d_out, cfg.r)
    pkey = cfg.pkey(entry)
    if cfg.storage == "stored":
        name = stored_p_names(cfg.sharing, pkey)[0 if factor == "A" else 1]
        return iter(ckpt.tensors[name])
    assert cfg.seed is not None  # parse_config guarantees a seed for generator rsg
    key = rsg.derive_key(cfg.seed, cfg.task_id, pkey, factor)
    return rsg.iter_slabs(key, cfg.k, rows, cols)


def checkpoint_deltas(ckpt: RsloraCheckpoint) -> list[ModuleDelta]:
    """Build (B~, A~, s) per module, verifying every P~ checksum before its factor is used.

    Raises:
        ChecksumError: E040 naming module, factor, expected and actual hash.
    """
    cfg = ckpt.config
    if cfg.sharing == "per_shape" and cfg.v_sharing == "global":
        logger.warning(
            "%s: per_shape projections with a global v give every module of a shape "
            "the identical dW (spec 3.4); this is rarely intended",
            ckpt.directory,
        )
    deltas = []
    for entry in cfg.modules.values():
        name_a, name_b = cfg.v_names(entry.name)
        factors = {}
        for factor, vname in (("A", name_a), ("B", name_b)):
            digest = hashlib.sha256()
            factors[factor] = rsg.combine(
                _basis_slabs(ckpt, entry, factor), ckpt.tensors[vname], digest=digest
            )
            want = cfg.checksums[cfg.pkey(entry)][factor]
            if digest.hexdigest() != want:
                raise ChecksumError(
                    f"projection checksum mismatch for {entry.name} factor {factor}: expected "
                    f"{want}, got {digest.hexdigest()}; the basis was altered or generated by a "
                    "different seed/task/generator",
                    code="E040",
                )
        deltas.append(
            ModuleDelta(
                name=entry.name,
                layout=entry.layout,
                d_in=entry.d_in,
                d_out=entry.d_out,
                out_slice=entry.out_slice,
                B=factors["B"],
                A=factors["A"],
                scale=cfg.scale,
                source={"format": "rslora-v1", "r": cfg.r, "k": cfg.k}
                | ({"dora": True} if cfg.dora else {}),
                magnitude=ckpt.tensors[magnitude_name(entry.name)] if cfg.dora else None,
            )
        )
    return deltas


class RsloraV1Format:
    """RS-LoRA v1 (``rslora_config.json`` + ``rslora_model.safetensors``; spec 4)."""

    name: ClassVar[str] = "rslora-v1"

    def claims(self, directory: Path, names: frozenset[str]) -> bool:
        """The directory holds ``rslora_config.json``."""
        return CONFIG_NAME in names

    def load(self, directory: Path, options: AdapterLoadOptions) -> AdapterContents:
        """Read and verify the checkpoint (checksums, projections) into ModuleDeltas."""
        ckpt = read_checkpoint(directory)
        cfg = ckpt.config
        base_hashes = {k: v for k, v in cfg.raw["base_model"].items() if isinstance(v, str)}
        summary = {
            "r": cfg.r,
            "k": cfg.k,
            "alpha": cfg.raw["alpha"],
            "effective_scale": cfg.scale,
            "task_id": cfg.task_id,
            "v_sharing": cfg.v_sharing,
            "v_ab_tied": cfg.v_ab_tied,
            **({"dora": True} if cfg.dora else {}),
            "projection": {
                "storage": cfg.storage,
                "generator": cfg.generator,
                "seed": cfg.seed,
                "sharing": cfg.sharing,
                "normalization": cfg.raw["projection"]["normalization"],
                "sha256_all": cfg.raw["projection"]["sha256_all"],
            },
            "checksums": "verified",
            "trainable_parameters": cfg.trainable_parameters(),
        }
        return AdapterContents(checkpoint_deltas(ckpt), summary, base_hashes)

    def base_shapes_needed(self, directory: Path) -> list[str]:
        """Projections are generated from the recorded seed and shapes: none needed."""
        return []
