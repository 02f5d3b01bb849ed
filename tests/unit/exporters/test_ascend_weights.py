"""Where the Ascend decoder's fp16 weights come from: a GPTQ checkpoint keeps GPTQ's choices, the
AWQ GEMM unpacking is the inverse of AutoAWQ's packing."""

from __future__ import annotations

import numpy as np
import torch

from rslora_deploy.evaluation.quality import dequantized_gptq_model
from rslora_deploy.exporters.ascend.weights import awq_dequantize, build_decoder

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column held by nibble j of each int32 (AutoAWQ GEMM)


def _awq_pack(codes: np.ndarray) -> np.ndarray:
    rows, cols = codes.shape
    packed = np.zeros((rows, cols // 8), dtype=np.uint32)
    for j, col in enumerate(AWQ_ORDER):
        packed |= codes[:, col::8].astype(np.uint32) << (4 * j)
    return packed.view(np.int32)


def test_awq_dequantize_inverts_autoawq_packing():
    gen = np.random.default_rng(0)
    rows, cols, group = 64, 32, 16
    q = gen.integers(0, 16, size=(rows, cols))
    z = gen.integers(0, 16, size=(rows // group, cols))
    s = gen.uniform(0.01, 0.1, size=(rows // group, cols)).astype(np.float16)
    want = ((q - np.repeat(z, group, 0)) * np.repeat(s.astype(np.float32), group, 0)).T
    got = awq_dequantize(_awq_pack(q), _awq_pack(z), s, 4)
    np.testing.assert_array_equal(got, want)


def test_gptq_checkpoint_is_dequantized_not_replaced(rtn_dir, tiny_dir):
    decoder, facts = build_decoder(rtn_dir, 32)
    assert facts["weights_from"] == "gptq dequantized"
    ref = dequantized_gptq_model(rtn_dir).model.layers[0].self_attn.q_proj.weight
    got = decoder.layers[0].self_attn.q_proj.weight
    assert torch.equal(got, ref.to(torch.float16))
    merged, _ = build_decoder(tiny_dir, 32)
    assert not torch.equal(got, merged.layers[0].self_attn.q_proj.weight)
