"""The quantizer registry: every entry imports, its name matches, unknown names list the known."""

from __future__ import annotations

import pytest

from rslora_deploy.errors import UnsupportedError
from rslora_deploy.quantizers import QUANTIZERS


def test_registry_entries_import_and_match():
    assert QUANTIZERS.names() == ["awq", "gptq", "rtn"]
    for name in QUANTIZERS:
        handler = QUANTIZERS.get(name)
        assert handler.name == name
        assert set(handler.supported_bits) <= {4, 8}


def test_unknown_method_lists_names():
    with pytest.raises(UnsupportedError, match="awq, gptq, rtn"):
        QUANTIZERS.get("hqq")
