"""Exporters: one module per runtime, registered by name; a profile says which one it uses.

``EXPORTERS.get(profile.exporter)`` imports the exporter (and its backend) only then, so importing
this package stays free of torch and onnxruntime. Adding an exporter: a module with a class that
follows :class:`rslora_deploy.exporters.base.Exporter`, one ``register_lazy`` line here, one row in
the exporter test table (docs/DESIGN.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rslora_deploy.registry import Registry

if TYPE_CHECKING:
    from rslora_deploy.exporters.base import Exporter

EXPORTERS: Registry[type[Exporter]] = Registry("exporter")

EXPORTERS.register_lazy(
    "onnxruntime-genai", "rslora_deploy.exporters.genai.exporter:GenaiExporter", extra="onnx"
)
EXPORTERS.register_lazy(
    "ascend-om", "rslora_deploy.exporters.ascend.exporter:AscendExporter", extra="onnx"
)


def get_exporter(name: str) -> Exporter:
    """An instance of the exporter registered as ``name``.

    Raises:
        UnsupportedError: unknown name (the message lists the registered ones).
        MissingDependencyError: its backend is not installed.
    """
    return EXPORTERS.get(name)()


__all__ = ["EXPORTERS", "get_exporter"]
