"""Weight quantizers: one file per method, registered lazily so importing this is free of torch.

``QUANTIZERS.get("gptq")`` imports :mod:`rslora_deploy.quantizers.gptq` (and gptqmodel) only then;
a missing engine raises :class:`~rslora_deploy.errors.MissingDependencyError` with the pip extra.
"""

from __future__ import annotations

from rslora_deploy.registry import Registry

QUANTIZERS: Registry[type] = Registry("quantizer")

QUANTIZERS.register_lazy("rtn", "rslora_deploy.quantizers.rtn:RTNQuantizer", extra="torch")
QUANTIZERS.register_lazy("gptq", "rslora_deploy.quantizers.gptq:GPTQQuantizer", extra="gptq")
QUANTIZERS.register_lazy("awq", "rslora_deploy.quantizers.awq:AWQQuantizer", extra="gptq")

__all__ = ["QUANTIZERS"]
