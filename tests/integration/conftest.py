"""Integration tests run the real SmolLM2-135M from the fetched cache (``make test`` fetches it)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2-135M-Instruct directory; fails (not skips) if assets are missing."""
    from rslora_deploy.assets import default_base_dir

    return default_base_dir()
