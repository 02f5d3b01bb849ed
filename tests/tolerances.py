"""Every numerical tolerance the tests use, in one table, each with the reason for its size.

A test compares two numbers that should agree only up to some arithmetic it can name; the name
of the constant says which. Tightening one here tightens every test that relies on that reason.
Tests import this module as ``from tests import tolerances as tol``.
"""

from __future__ import annotations

from rslora_deploy.evaluation.quality import ONNX_LOGIT_ERROR_LIMIT

# --- float64: the same formula, only evaluated in another order -------------------------------
#: Relative: float64 has a 2^-53 (1.1e-16) unit round-off; a few thousand reassociated terms stay
#: far below 1e-12.
F64_RTOL = 1e-12
#: Absolute floor for entries that are (close to) zero, where a relative bound means nothing.
F64_ATOL = 1e-15
#: Analytic identities computed through exp/log in float64 (KL of equal distributions, a
#: projection onto itself, a log-softmax shifted by 1e4): cancellation leaves about 1e-12.
F64_IDENTITY = 1e-9
#: Absolute floor beside F64_IDENTITY for values that should be exactly 0 or 1 (KL of a
#: distribution with itself, sum(exp(log p))): a few ulps of float64 after exp/log.
F64_IDENTITY_ATOL = 1e-12

# --- float32 ------------------------------------------------------------------------------------
#: One float32 rounding of a value of order 1 (W + dW merged in fp32, a float32 matmul of a tiny
#: layer against its float64 reference): 2^-24 = 6e-8 per rounding, 1e-6 for a short sum.
FP32_ATOL = 1e-6
#: float64 factors stored as float32 and read back (RS-LoRA -> PEFT export): relative 2^-24 per
#: factor, 1e-6 with headroom for their product.
FP32_STORAGE_RTOL = 1e-6
#: Absolute floor beside FP32_STORAGE_RTOL for entries near zero (products of two factors).
FP32_STORAGE_ATOL = 1e-7
#: An RS-LoRA adapter exported to PEFT (float32 A and s*B) and merged again: two float32-rounded
#: factors multiplied and summed over r terms, relative to dW.
FP32_EXPORT_RTOL = 1e-5
#: A difference of float32 constants against its exact value (1.01f - 1 vs 0.01): 1.01 is stored
#: to 2^-24 relative, and subtracting 1 magnifies that 100x (measured 9.5e-7).
FP32_DIFFERENCE_RTOL = 1e-5
#: Logits of a 2-layer tiny model along two fp32 paths (merged weights vs on-the-fly adapter or
#: PEFT's forward): roundings add up over layers; relative to the logits' scale.
FP32_LOGITS_RTOL = 1e-5
#: As FP32_LOGITS_RTOL after an autograd training step has run through the same weights (more
#: float32 operations between the two sides).
FP32_TRAINED_RTOL = 1e-4

# --- quantized models -----------------------------------------------------------------------------
#: 8-bit RTN at group 64: the step is 1/255 of a group's range, so the relative Frobenius error is
#: about 0.4%; 1% catches a wrong scale or zero point.
RTN8_RELATIVE_ERROR = 0.01
#: An ONNX graph with fp32 activations against the exact dequantization of the same checkpoint:
#: only float rounding differs (measured ~1e-6 on the tiny model).
ONNX_VS_EXACT_DEQUANT = 1e-4
#: The build's own gate between the builder's ONNX int4 model and the PyTorch quantized model
#: (stack notes: 0.006-0.014 on SmolLM2).
ONNX_VS_TORCH = ONNX_LOGIT_ERROR_LIMIT
#: A --protect-adapter package on a CPU target (fp32 activations, accuracy level 1, protected
#: modules as exact fp32 MatMul) against the PyTorch quantized model: rounding only.
ONNX_VS_TORCH_PROTECTED = 1e-3
#: gptqmodel's CPU kernel runs int4 matmuls in bf16 (8-bit mantissa): a reload of the saved
#: checkpoint differs from the in-memory model by up to about 1% relative.
GPTQMODEL_BF16_KERNEL = 0.02
#: The dry budget's predicted weight bytes against the exported ones: the formula leaves out
#: small graph tensors (norms, rotary caches) that add about 1%.
BUDGET_PREDICTION = 0.02

# --- the Ascend fp16 graph (ascend-om exporter) ---------------------------------------------------
#: The fp16 decoder (fp16 weights and matmuls, fp32 RMSNorm/softmax) on ONNX Runtime CPU against
#: the fp32 transformers model, relative L2 of the prompt logits: fp16 has a 2^-11 (4.9e-4) unit
#: round-off; measured 6e-4 to 8e-4 on the tiny Llama/Qwen2 configs.
ASCEND_FP16_LOGITS = 5e-3
#: The same prompt prefilled in one padded gear call vs fed one token at a time: different fp16
#: summation orders, max |difference| relative to the largest logit.
ASCEND_PREFILL_VS_STEP = 2e-2
#: Two greedy candidates whose fp16 logits differ by at most this many ulps of the top logit are
#: a tie decided by rounding (2^-10 is one fp16 ulp relative).
ASCEND_TIE_RELATIVE = 2.0**-9
