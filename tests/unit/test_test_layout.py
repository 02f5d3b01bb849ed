"""tests/unit mirrors the package: every test folder is named after a folder of rslora_deploy."""

from __future__ import annotations

from pathlib import Path

import rslora_deploy

UNIT = Path(__file__).resolve().parent
PACKAGE = Path(rslora_deploy.__file__).resolve().parent


def test_every_unit_test_folder_mirrors_a_package_folder() -> None:
    folders = [p for p in UNIT.rglob("*") if p.is_dir() and p.name != "__pycache__"]
    stray = [
        str(p.relative_to(UNIT))
        for p in folders
        if not (PACKAGE / p.relative_to(UNIT) / "__init__.py").is_file()
    ]
    assert folders, UNIT
    assert not stray, f"test folders with no package folder of that name: {stray}"
