"""User rename map: recorded module names -> live module names of the base (spec 5.2 step 1).

Spec 5.2 step 1 resolves each module "by exact name (after an optional user rename map)", and the
note on module renames (spec 9) says keys use the *recorded* names, so P~ is stable under renames.
This module only rewrites ``ModuleDelta.name`` / ``TensorOverride.name`` **after** the adapter is
loaded: RSG-1 keys and checksums were already derived from the recorded names by then.

Map keys are **dotted prefixes** (decision in docs/rslora-format.md): ``{"model.language_model":
"model"}`` rewrites ``model.language_model.layers.0.q_proj`` to ``model.layers.0.q_proj``. A full
module name is a prefix of itself, so exact renames work the same way. The longest matching key
wins and a name is rewritten once (no chaining). A trailing ``.`` on either side is ignored; an
empty new prefix removes the old one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from rslora_deploy.errors import ConfigError

logger = logging.getLogger(__name__)


def normalize_prefix(prefix: str) -> str:
    """Strip surrounding whitespace and trailing dots (``"model."`` and ``"model"`` are equal)."""
    return prefix.strip().rstrip(".")


def check_rename_map(rename: Mapping[str, str]) -> dict[str, str]:
    """Normalized copy of ``rename``.

    Raises:
        ConfigError: an empty old prefix, whitespace or ``=`` inside a prefix, or two keys that
            are equal after normalization.
    """
    out: dict[str, str] = {}
    for old, new in rename.items():
        key, value = normalize_prefix(old), normalize_prefix(new)
        if not key:
            raise ConfigError(
                f"adapter.rename: empty old prefix in {old!r} = {new!r}; write "
                "OLD=NEW with OLD a dotted module-name prefix"
            )
        for part in (key, value):
            if any(c.isspace() or c == "=" for c in part):
                raise ConfigError(
                    f"adapter.rename: {part!r} is not a dotted module-name "
                    "prefix (no spaces or '='); write OLD=NEW"
                )
        if key in out and out[key] != value:
            raise ConfigError(
                f"adapter.rename: {key!r} is mapped twice ({out[key]!r} and {value!r}); keep one"
            )
        out[key] = value
    return out


def parse_rename_args(items: Iterable[str] | None) -> dict[str, str]:
    """``["OLD=NEW", ...]`` from repeated ``--rename`` options into a checked map.

    Raises:
        ConfigError: an item without ``=`` or with an empty OLD, or the checks of
            :func:`check_rename_map`.
    """
    pairs: dict[str, str] = {}
    for item in items or ():
        old, sep, new = item.partition("=")
        if not sep or not old.strip():
            raise ConfigError(
                f"--rename {item!r} is malformed; write --rename OLD=NEW, e.g. "
                "--rename model.language_model=model"
            )
        if normalize_prefix(old) in pairs and pairs[normalize_prefix(old)] != normalize_prefix(new):
            raise ConfigError(
                f"--rename maps {old!r} twice ({pairs[normalize_prefix(old)]!r} "
                f"and {new!r}); keep one"
            )
        pairs[normalize_prefix(old)] = normalize_prefix(new)
    return check_rename_map(pairs)


def rename_name(name: str, rename: Mapping[str, str]) -> str:
    """The live name of recorded module ``name``: the longest matching prefix is replaced."""
    best = None
    for old in rename:
        if (name == old or name.startswith(old + ".")) and (best is None or len(old) > len(best)):
            best = old
    if best is None:
        return name
    new, rest = rename[best], name[len(best) :].lstrip(".")
    return f"{new}.{rest}" if new and rest else (new or rest)


def apply_renames(items: Iterable[Any], rename: Mapping[str, str]) -> dict[str, str]:
    """Rewrite ``item.name`` of deltas/overrides in place; remember the recorded name.

    Each renamed item keeps its recorded name in ``item.recorded_name`` so errors (E020) can
    name both. Several items with one recorded name (``out_slice`` deltas of a fused weight)
    are fine; two *different* recorded names landing on one live name are not.

    Returns:
        ``{recorded: live}`` for every name the map changed (for merge_report.json).

    Raises:
        ConfigError: the map sends two recorded modules onto one name, or produces an empty name.
    """
    rename = check_rename_map(rename)
    if not rename:
        return {}
    items = list(items)
    live_of: dict[str, str] = {}
    for item in items:
        recorded = getattr(item, "recorded_name", None) or item.name
        live_of[recorded] = rename_name(recorded, rename)
    owners: dict[str, str] = {}
    for recorded, live in sorted(live_of.items()):
        if not live:
            raise ConfigError(
                f"adapter.rename turns module {recorded!r} into an empty name; fix the map"
            )
        if live in owners:
            raise ConfigError(
                f"adapter.rename maps both {owners[live]!r} and {recorded!r} onto "
                f"{live!r}; a rename must keep module names distinct"
            )
        owners[live] = recorded
    for item in items:
        recorded = getattr(item, "recorded_name", None) or item.name
        item.recorded_name = recorded
        item.name = live_of[recorded]
    unused = [
        old for old in rename if not any(r == old or r.startswith(old + ".") for r in live_of)
    ]
    if unused:
        logger.warning("adapter.rename: prefixes %s match no module of the adapter", unused)
    return {r: live for r, live in sorted(live_of.items()) if r != live}
