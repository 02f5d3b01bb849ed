"""Integration tests run the real SmolLM2-135M from the fetched cache (``make test`` fetches it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _session_stage_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One stage cache for the session, never the user's: builds of the same inputs in several
    tests reuse each other's stages, and nothing outlives the run."""
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("stage-cache")
        patch.setenv("RSLORA_DEPLOY_STAGE_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2-135M-Instruct directory; fails (not skips) if assets are missing."""
    from rslora_deploy.data.assets import default_base_dir

    return default_base_dir()


def _build_package(root: Path, recipe: str, profile: str, *flags: str) -> Path:
    """Run ``rslora-deploy build`` with ``recipe`` (TOML text) into ``root/pkg``; assert exit 0."""
    from rslora_deploy.cli.app import main

    recipe_path = root / "recipe.toml"
    recipe_path.write_text(recipe)
    out = root / "pkg"
    argv = ["build", "--profile", profile, "--recipe", str(recipe_path), "--out", str(out)]
    assert main([*argv, *flags]) == 0
    return out


@pytest.fixture(scope="session")
def build_package():
    """The builder of the integration tests' package fixtures (see :func:`_build_package`)."""
    return _build_package
