"""Adapter formats (RS-LoRA v1, PEFT LoRA, PEFT VeRA) and their single internal representation.

Importing this package pulls in numpy only; torch is imported by the modules that need it.
"""

from __future__ import annotations

from pathlib import Path


def demo_adapter_dir() -> Path:
    """The embedded demo RS-LoRA adapter (SmolLM2-135M, one Brown genre; docs/demo-adapter.md)."""
    return Path(__file__).resolve().parent.parent / "demo" / "adapter"
