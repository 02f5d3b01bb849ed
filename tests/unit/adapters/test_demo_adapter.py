"""The committed demo adapter: small, valid, seed mode (its merge into SmolLM2: integration)."""

from __future__ import annotations

from rslora_deploy.adapters import demo_adapter_dir
from rslora_deploy.adapters.detect import load_adapter
from rslora_deploy.adapters.rslora_v1 import read_checkpoint


def test_demo_adapter_is_small_seed_mode_and_verifies() -> None:
    path = demo_adapter_dir()
    sizes = {p.name: p.stat().st_size for p in path.iterdir()}
    assert set(sizes) >= {"rslora_config.json", "rslora_model.safetensors"}
    assert sizes["rslora_model.safetensors"] < 64 * 1024  # kilobytes, not megabytes
    cfg = read_checkpoint(path).config
    assert cfg.storage == "seed"
    assert cfg.generator == "rsg"
    assert (cfg.r, cfg.k) == (64, 8)
    adapter = load_adapter(path)  # regenerates every P~ and checks its sha256
    assert adapter.meta["checksums"] == "verified"
    assert len(adapter.deltas) == 210
    assert any(abs(d.delta_weight()).max() > 0 for d in adapter.deltas[:3])
