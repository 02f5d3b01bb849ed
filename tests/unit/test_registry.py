"""The generic registry: duplicates, unknown names, lazy imports and missing backends."""

from __future__ import annotations

import pytest

from rslora_deploy.errors import MissingDependencyError, UnsupportedError
from rslora_deploy.registry import Registry


def test_register_and_alias() -> None:
    reg: Registry[object] = Registry("widget")

    @reg.register("a", "alias")
    class A:
        pass

    assert reg.get("a") is A
    assert reg.get("alias") is A
    assert reg.names() == ["a", "alias"]


def test_duplicate_raises() -> None:
    reg: Registry[object] = Registry("widget")
    reg.register("a")(object)
    with pytest.raises(ValueError, match="duplicate widget name 'a'"):
        reg.register("a")(object)


def test_unknown_lists_names() -> None:
    reg: Registry[object] = Registry("widget")
    reg.register("gptq")(object)
    with pytest.raises(UnsupportedError, match="unknown widget 'x'; registered: gptq"):
        reg.get("x")


def test_lazy_import_and_missing_backend() -> None:
    reg: Registry[object] = Registry("widget")
    reg.register_lazy("json", "json:dumps")
    reg.register_lazy("ghost", "no_such_module_xyz:thing", extra="gptq")
    import json

    assert reg.get("json") is json.dumps
    with pytest.raises(MissingDependencyError, match=r"rslora-deploy\[gptq\]"):
        reg.get("ghost")
