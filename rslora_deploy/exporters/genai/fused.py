"""Which Hugging Face modules the onnxruntime-genai builder fuses into one ``MatMulNBits`` node.

Owned here, by the exporter whose graph does the fusing: the mixed-bits rewrite maps nodes back to
modules with it, and protection planning is handed :data:`FUSED_GROUPS` so that modules sharing a
node also share a bit width (one node has one precision).

Some architectures fuse in the Hugging Face model itself: Phi-3 stores ``self_attn.qkv_proj`` and
``mlp.gate_up_proj``, GLM-4 ``mlp.gate_up_proj``. The builder's node is then that one module
(:func:`hf_modules` is told which modules the checkpoint holds), and protection planning needs no
group for it: a single module has a single bit width anyway.
"""

from __future__ import annotations

from collections.abc import Collection

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


def hf_modules(
    layer: str, node_suffix: str, present: Collection[str] | None = None
) -> tuple[str, ...]:
    """The Hugging Face modules behind builder node ``{layer}.{node_suffix}``, in row order.

    Args:
        layer: the layer prefix, ``model.layers.3``.
        node_suffix: the builder's name inside the layer, ``attn.qkv_proj`` or ``mlp.down_proj``.
        present: the checkpoint's module names. When it holds the fused module itself
            (Phi-3's ``model.layers.3.self_attn.qkv_proj``), that one module is the node;
            None assumes the split layout (Llama, Qwen, Mistral).
    """
    own = f"{layer}.{node_suffix.replace('attn.', 'self_attn.', 1)}"
    if node_suffix in FUSED_NODES and (present is None or own not in present):
        return tuple(f"{layer}.{part}" for part in FUSED_NODES[node_suffix])
    return (own,)
