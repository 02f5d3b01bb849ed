"""Weight quantizers: one file per method, registered lazily so importing this is free of torch.

``QUANTIZERS.get("gptq")`` imports :mod:`rslora_deploy.quantizers.gptq` (and gptqmodel) only then;
a missing engine raises :class:`~rslora_deploy.errors.MissingDependencyError` with the pip extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rslora_deploy.registry import Registry

if TYPE_CHECKING:
    from rslora_deploy.quantizers.base import Quantizer

QUANTIZERS: Registry[type[Quantizer]] = Registry("quantizer")

QUANTIZERS.register_lazy("rtn", "rslora_deploy.quantizers.rtn:RTNQuantizer", extra="torch")
QUANTIZERS.register_lazy("gptq", "rslora_deploy.quantizers.gptq:GPTQQuantizer", extra="gptq")
QUANTIZERS.register_lazy("awq", "rslora_deploy.quantizers.awq:AWQQuantizer", extra="gptq")

__all__ = ["QUANTIZERS"]
