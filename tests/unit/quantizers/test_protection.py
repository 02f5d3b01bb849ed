"""Protection planning: which modules --protect-adapter keeps at 8 bits, and what it costs."""

from __future__ import annotations

from rslora_deploy.exporters.genai.fused import FUSED_GROUPS, FUSED_NODES
from rslora_deploy.quantizers import protection


def test_fused_groups_are_the_builders_fused_nodes():
    assert FUSED_GROUPS == (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    assert len(FUSED_GROUPS) == len(FUSED_NODES)


def test_protected_rtn_is_bigger(tmp_path, tiny_dir):
    """--protect-adapter's 8-bit modules cost bytes; the size function sees it."""
    from rslora_deploy.artifact import Artifact
    from rslora_deploy.config import QuantizeConfig
    from rslora_deploy.quantizers.base import QuantizeExtras
    from rslora_deploy.stages.quantize import quantize_model

    cfg = QuantizeConfig(method="rtn")
    plain = quantize_model(Artifact("hf", tiny_dir), tmp_path / "a", cfg).path
    dyn = {r"+:^model\.layers\.0\.mlp\.up_proj$": {"bits": 8}}
    prot = quantize_model(
        Artifact("hf", tiny_dir), tmp_path / "b", cfg, extras=QuantizeExtras(dynamic=dyn)
    ).path
    a, b = protection.quantized_weight_bytes(plain), protection.quantized_weight_bytes(prot)
    # up_proj [256, 128]: 4-bit qweight 16 KiB -> 8-bit 32 KiB; qzeros double too.
    assert b - a == 128 * 256 // 2 + 2 * 256 // 2


def test_protection_widens_to_fused_siblings_and_costs():
    from rslora_deploy.quantizers.checkpoint import LinearSpec

    ratios = {
        "m.layers.0.self_attn.k_proj": {"ratio": 0.1},
        "m.layers.0.mlp.down_proj": {"ratio": 5.0},
    }
    mods = protection.protected_modules(ratios, FUSED_GROUPS, max_ratio=1.0)
    assert mods == [f"m.layers.0.self_attn.{p}" for p in ("k_proj", "q_proj", "v_proj")]
    specs = [LinearSpec("m.layers.0.self_attn.q_proj", 128, 128, False)]
    # 4 -> 8 bits on [128, 128] at g64: qweight +8192 B, qzeros 2 groups x 128 x 0.5 B = +128 B.
    assert protection.protection_cost_bytes(specs, mods, 4, 64) == 8192 + 128
    assert protection.gptq_layer_bytes(128, 128, 4, 64) == 8192 + 128 + 512 + 512
