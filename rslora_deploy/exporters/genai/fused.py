"""Which Hugging Face modules the onnxruntime-genai builder fuses into one ``MatMulNBits`` node.

Owned here, by the exporter whose graph does the fusing: the mixed-bits rewrite maps nodes back to
modules with it, and protection planning is handed :data:`FUSED_GROUPS` so that modules sharing a
node also share a bit width (one node has one precision).
"""

from __future__ import annotations

#: Builder node suffix -> the Hugging Face modules behind it, in the order the builder
#: concatenates their output rows (the builder also renames ``self_attn`` to ``attn``).
FUSED_NODES: dict[str, tuple[str, ...]] = {
    "attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}

#: The same groups as leaf names: ``(("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))``.
FUSED_GROUPS: tuple[tuple[str, ...], ...] = tuple(
    tuple(module.rpartition(".")[2] for module in modules) for modules in FUSED_NODES.values()
)
