"""The export layout: lm_head / embedding precision and ``accuracy_level`` per builder target.

The layouts and their measured costs (docs/export.md, ``benchmarks/bench_vs_builder.py``). The CPU
default is the int4 head at level 4, the one layout measured to beat the builder's own int4 on
decode speed, perplexity and size at once; the fp32 head at level 1 is the quality option:

* ``lm_head``: on the CPU target (fp32 activations) the tied lm_head is the largest single read
  of every decoded token: 49152 x 576 fp32 = 113 MB on SmolLM2, 8.5x the int4 decoder layers'
  bytes. int4 per block of 32 (the builder's ``GatherBlockQuantized`` shares the same codes with
  the embedding) reads 17.7 MB. On the CUDA target the graph is fp16 and the T4 has no CPU-side
  bandwidth bottleneck to argue from here (no GPU measured): it keeps the conservative fp16
  table, as before.
* ``accuracy_level``: 4 on CPU (int8 activations inside ``MatMulNBits``; the fast kernel), 1 on
  CUDA, whose kernel ignores it, so that the CPU run of a CUDA package (verification on a
  machine without a GPU, :func:`rslora_deploy.exporters.genai.builder.cpu_view`) computes what
  the GPU computes (fp32 activations, no activation quantization).

Precisions a target cannot run are refused before any work is done: a CPU-target graph has fp32
activations and cannot hold an fp16 lm_head, a CUDA-target graph is fp16 and cannot hold an fp32
one (:func:`check_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass

from rslora_deploy.errors import ConfigError
from rslora_deploy.exporters.genai.options import GenaiExportConfig

#: What each builder target can hold for lm_head (and a tied embedding), besides ``auto``.
LM_HEAD_CHOICES: dict[str, tuple[str, ...]] = {
    "cpu": ("fp32", "int8", "int4"),
    "cuda": ("fp16", "int8", "int4"),
}
#: ``auto`` per target (docs/export.md). CPU: the int4 head (one table shared with the
#: embedding) at level 4. Measured side by side on SmolLM2 + demo adapter, GPTQ, 64 x 512 Brown
#: tokens (benchmarks/results/vs_builder_smollm2.json): 57.0 tok/s vs the builder default's 54.0
#: (1.05x), perplexity 55.73 vs 60.95, 77.1 vs 82.5 MiB; Gemma-3-270M (vs_builder_gemma3.json):
#: 40.8 vs 38.3 tok/s (1.07x), 51.85 vs 64.67, 219.0 vs 224.2 MiB. The fp32 head at level 1 scores
#: 48.05 on SmolLM2 but decodes at 0.42x the builder and ships 2x its size: selectable with
#: ``--lm-head fp32`` and ``export.accuracy_level = 1``. The cpu-2gb budget charges this layout's
#: packed copy (``nbits_prepack_factor``, docs/budget.md).
LM_HEAD_DEFAULT = {"cpu": "int4", "cuda": "fp16"}
#: ``accuracy_level`` when the recipe leaves it unset.
ACCURACY_LEVEL_DEFAULT = {"cpu": 4, "cuda": 1}
#: ONNX-vs-PyTorch relative logit error allowed per (accuracy level, lm_head quantized). The
#: PyTorch side keeps lm_head in full precision and fp32 activations, so what the export changes
#: on purpose is inside the measured difference. Measured on SmolLM2 + demo adapter (8 x 512
#: Brown tokens, docs/export.md section 4): level 1, fp32 head 0.0103 (demo build); level 4, fp32
#: head 0.045; level 4, int4 head 0.081. Limits are about 2x those; (1, True) was not measured
#: separately and takes the (4, True) limit, which bounds it (level 4 only adds error).
PARITY_TOLERANCE = {
    (1, False): 0.02,
    (1, True): 0.15,
    (4, False): 0.08,
    (4, True): 0.15,
}


@dataclass(frozen=True)
class Layout:
    """The resolved layout of one export."""

    target: str
    lm_head: str
    accuracy_level: int
    lm_head_block_size: int
    lm_head_sym: bool

    @property
    def lm_head_quantized(self) -> bool:
        """True when lm_head (and a tied embedding) ship as integer codes."""
        return self.lm_head in ("int4", "int8")


def resolve(cfg: GenaiExportConfig, target: str, profile_name: str = "") -> Layout:
    """Resolve ``auto`` fields for ``target`` and check the rest.

    Raises:
        ConfigError: the lm_head precision is one the target cannot run (naming the profile and
            the options it accepts).
    """
    target = str(getattr(target, "value", target))  # a profile's ExportTarget member
    choices = LM_HEAD_CHOICES.get(target)
    if choices is None:
        raise ConfigError(
            f"export target {target!r} has no layout; use one of {list(LM_HEAD_CHOICES)}"
        )
    lm_head = LM_HEAD_DEFAULT[target] if cfg.lm_head == "auto" else cfg.lm_head
    if lm_head not in choices:
        where = f"profile {profile_name!r}" if profile_name else f"export target {target!r}"
        raise ConfigError(
            f"export.lm_head={lm_head} cannot run on {where} (a {target} graph holds "
            f"{'fp16' if target == 'cuda' else 'fp32'} activations); use one of "
            f"{', '.join(('auto', *choices))}"
        )
    level = cfg.accuracy_level
    if level is None:
        level = ACCURACY_LEVEL_DEFAULT[target]
    return Layout(target, lm_head, level, cfg.lm_head_block_size, cfg.lm_head_sym)


def builder_options(layout: Layout, tied: bool) -> list[str]:
    """The builder's ``--extra_options`` for ``layout``.

    A GPTQ/AWQ checkpoint's decoder layers are already quantized, so these options only decide
    lm_head and the embedding: excluded (full precision, one shared table when tied), or quantized
    by the builder's RTN at ``block_size`` (``algo_config=rtn`` names its tied codes consistently
    for both symmetric and asymmetric grids; the default algorithm does not for asymmetric).
    """
    # A full-length KV cache for sliding-window layers too (Gemma-3): the ring-buffer cache the
    # builder would otherwise write cannot be fed by a plain onnxruntime session (capacity 0 at
    # the first step), which the evaluation and the parity checks use; the budget already charges
    # every layer a full-length cache.
    extra = [f"accuracy_level={layout.accuracy_level}", "windowed_kv_cache=false"]
    if not layout.lm_head_quantized:
        extra.append("nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather")
        if tied:
            extra.append("shared_embeddings=true")
        return extra
    extra += [
        f"block_size={layout.lm_head_block_size}",
        f"is_symmetric={str(layout.lm_head_sym).lower()}",
        "algo_config=rtn_last" if layout.lm_head == "int8" else "algo_config=rtn",
    ]
    if layout.lm_head == "int8" and tied:
        # GatherBlockQuantized (the builder's quantized embedding) takes 4-bit codes only: an
        # 8-bit lm_head cannot share its table, so the embedding stays a full-precision Gather.
        extra += ["shared_embeddings=false", "nodes_to_exclude=/model/embed_tokens/Gather"]
    return extra


def parity_tolerance(layout: Layout) -> float:
    """The ONNX-vs-PyTorch relative logit error a correct export of ``layout`` stays under."""
    level = 4 if layout.target == "cpu" and layout.accuracy_level == 4 else 1
    return PARITY_TOLERANCE[(level, layout.lm_head_quantized)]
