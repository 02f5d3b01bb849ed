"""One generic name -> handler registry, used for quantizers, adapter formats and exporters.

Heavy backends register lazily as ``"module:attr"`` strings so that ``import rslora_deploy`` stays
free of torch, gptqmodel and onnxruntime (see tests/unit/test_lean_import.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from rslora_deploy.errors import MissingDependencyError, UnsupportedError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of handlers.

    Args:
        kind: what the entries are, used in error messages ("quantizer", "adapter format").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = {}
        self._extras: dict[str, str] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name`` and any aliases."""

        def decorator(obj: T) -> T:
            for key in (name, *aliases):
                self._add(key, obj)
            return obj

        return decorator

    def register_lazy(self, name: str, target: str, *, extra: str = "") -> None:
        """Register ``"package.module:attr"``, imported on first lookup.

        Args:
            name: registry key.
            target: import path of the handler.
            extra: pip extra that installs its backend, named in the error when it is missing.
        """
        self._add(name, target)
        if extra:
            self._extras[name] = extra

    def _add(self, key: str, obj: T | str) -> None:
        if key in self._entries:
            raise ValueError(f"duplicate {self.kind} name {key!r}")
        self._entries[key] = obj

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a plug-in remove it again).

        Raises:
            UnsupportedError: ``name`` is not registered.
        """
        if name not in self._entries:
            raise UnsupportedError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}"
            )
        del self._entries[name]
        self._extras.pop(name, None)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is registered (lazy entries count; nothing is imported)."""
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        """The registered names, sorted (as :meth:`names`)."""
        return iter(self.names())

    def get(self, name: str) -> T:
        """Return the handler, importing it if it was registered lazily.

        Raises:
            UnsupportedError: unknown name (the message lists the registered ones).
            MissingDependencyError: the backend module cannot be imported.
        """
        try:
            entry = self._entries[name]
        except KeyError:
            raise UnsupportedError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}"
            ) from None
        if not isinstance(entry, str):
            return entry
        module_name, _, attr = entry.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            extra = self._extras.get(name, "all")
            raise MissingDependencyError(
                f"{self.kind} {name!r} needs a backend that is not installed ({exc}); "
                f"run: pip install 'rslora-deploy[{extra}]'"
            ) from exc
        handler: T = getattr(module, attr)
        self._entries[name] = handler
        return handler
