"""Adapter formats (RS-LoRA v1, PEFT LoRA, PEFT VeRA) and their single internal representation.

Importing this package pulls in no format module; ``ADAPTER_FORMATS.get(name)`` imports one on
first use. Adding a format: a module with a class that follows
:class:`rslora_deploy.adapters.base.AdapterFormat`, one ``register_lazy`` line here, one row in the
format test table (docs/DESIGN.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rslora_deploy.registry import Registry

if TYPE_CHECKING:
    from rslora_deploy.adapters.base import AdapterFormat

ADAPTER_FORMATS: Registry[type[AdapterFormat]] = Registry("adapter format")

ADAPTER_FORMATS.register_lazy("rslora-v1", "rslora_deploy.adapters.rslora_v1:RsloraV1Format")
ADAPTER_FORMATS.register_lazy("peft-lora", "rslora_deploy.adapters.peft_lora:PeftLoraFormat")
ADAPTER_FORMATS.register_lazy("peft-vera", "rslora_deploy.adapters.peft_vera:PeftVeraFormat")


def demo_adapter_dir() -> Path:
    """The embedded demo RS-LoRA adapter (SmolLM2-135M, one Brown genre; docs/demo-adapter.md)."""
    return Path(__file__).resolve().parent.parent / "demo" / "adapter"
