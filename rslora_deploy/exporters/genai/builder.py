"""Stage ``export_onnx``: a quantized Hugging Face checkpoint -> onnxruntime-genai model folder.

The engine is the onnxruntime-genai model builder (``onnxruntime_genai.models.builder``). It reads a
GPTQ/AWQ checkpoint and repacks its int4 weights into ``MatMulNBits`` nodes, fuses attention into
``GroupQueryAttention`` with a KV cache, and writes ``genai_config.json`` + tokenizer files.

It runs in a subprocess: the builder prints thousands of progress lines and holds the whole model
in memory; a child process keeps both out of ours (its log goes to ``export.log``).

Choices (docs/export.md; the layout per target is :mod:`rslora_deploy.exporters.genai.layout`):
* lm_head and a tied embedding: on CPU targets int4 per block of 32 by default, one table shared
  by lm_head ``MatMulNBits`` and the embedding ``GatherBlockQuantized`` (fp32 is selectable:
  better perplexity, 0.42x the decode speed); fp16 on CUDA.
  An fp32 tied table is read in full by lm_head on every decoded token (113 MB on SmolLM2, 65% of
  that package's bytes per token) and reaches the embedding ``Gather`` through a ``Transpose``
  that onnxruntime folds into a second copy at load (measured: benchmarks/profile_decode.py).
* ``accuracy_level``: 4 on CPU targets by default (int8 activations inside ``MatMulNBits``, the
  fast CPU kernel), 1 on CUDA targets, whose kernel ignores it (docs/export.md).
* The builder target comes from the profile: ``cuda`` gives fp16 activations for the T4; ``cpu``
  gives fp32 activations (Ascend, where CANN runs the standard ops and MatMulNBits falls back).
* ``search.max_length`` is set to the profile's ``max_seq_len`` because onnxruntime-genai
  preallocates the KV cache to it: that is the number the budget charges.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from rslora_deploy.artifact import Artifact
from rslora_deploy.errors import ExportError, UnsupportedError
from rslora_deploy.exporters.genai import layout
from rslora_deploy.exporters.genai.options import GenaiExportConfig
from rslora_deploy.profiles import DeviceProfile

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"

#: Architectures transformers 5.24 builds that the onnxruntime-genai 0.18 builder cannot read
#: (its GLM support is the remote-code ``ChatGLMModel`` only; ``GlmForCausalLM`` and
#: ``Glm4ForCausalLM`` end in ``NotImplementedError: ... is not currently supported``).
BUILDER_REFUSES = frozenset({"GlmForCausalLM", "Glm4ForCausalLM"})
#: The builder's own words for an architecture it has no class for.
_BUILDER_NOT_SUPPORTED = "is not currently supported"


def check_architecture(model_dir: Path, profile: DeviceProfile) -> None:
    """Refuse, before the builder runs, an architecture it cannot read.

    Raises:
        UnsupportedError: naming the architecture, the profile and the profiles that take it.
    """
    from rslora_deploy.model_view import model_view

    arch = model_view(model_dir).architecture
    if arch in BUILDER_REFUSES:
        raise unsupported_architecture(arch, profile)


def unsupported_architecture(arch: str, profile: DeviceProfile) -> UnsupportedError:
    """The one-line error for an architecture the builder cannot read on ``profile``."""
    taking = profiles_taking(arch)
    others = (
        f"profiles that take it: {', '.join(taking)}" if taking else "no shipped profile takes it"
    )
    return UnsupportedError(
        f"architecture {arch} cannot be exported on profile {profile.name!r}: its exporter "
        f"{profile.exporter} runs the onnxruntime-genai 0.18 model builder, which has no {arch} "
        f"model; {others}"
    )


def profiles_taking(arch: str) -> list[str]:
    """Shipped profiles whose exporter takes ``arch``.

    onnxruntime-genai takes all but :data:`BUILDER_REFUSES`, ascend-om its architecture table.
    """
    from rslora_deploy.exporters.ascend.weights import ARCHITECTURES
    from rslora_deploy.profiles import list_profiles

    accepts = {
        "onnxruntime-genai": arch not in BUILDER_REFUSES,
        "ascend-om": arch in ARCHITECTURES,
    }
    return [p.name for p in list_profiles() if accepts.get(str(p.exporter), False)]


def builder_command(
    source: Path,
    out_dir: Path,
    cache_dir: Path,
    lay: layout.Layout,
    tied_embeddings: bool = False,
    last_token_logits: bool = False,
) -> list[str]:
    """The builder command line for one export (kept separate so tests can inspect it).

    The builder runs through :mod:`rslora_deploy.exporters.genai.run_builder`, its own entry
    point with a config view for fields transformers 5 moved (Gemma-3's RoPE bases).
    """
    extra = layout.builder_options(lay, tied_embeddings)
    if last_token_logits:
        extra.append("prune_lm_head=true")  # rslora_deploy/last_token_logits.py
    return [
        sys.executable, "-m", "rslora_deploy.exporters.genai.run_builder",
        "-i", str(source), "-o", str(out_dir), "-p", "int4", "-e", lay.target,
        "-c", str(cache_dir), "--extra_options", *extra,
    ]  # fmt: skip


def export_onnx(
    quantized: Artifact,
    out_dir: Path,
    cfg: GenaiExportConfig,
    profile: DeviceProfile,
    log_path: Path,
) -> Artifact:
    """Export ``quantized`` to an onnxruntime-genai folder at ``out_dir``.

    Raises:
        ExportError: the builder failed (the message quotes its last error line and the log path).
    """
    cache_dir = out_dir.parent / f".{out_dir.name}.builder-cache"
    from rslora_deploy.exporters.genai import mixed_bits
    from rslora_deploy.model_view import model_view

    lay = layout.resolve(cfg, profile.export_target, profile.name)
    check_architecture(quantized.path, profile)
    tied = model_view(quantized.path).tie_word_embeddings
    mixed = mixed_bits.mixed_bits(quantized.path)
    source = quantized.path
    if mixed is not None:
        # The builder reads one bit width: it gets a uniform 4-bit view, and the protected
        # modules' 8-bit weights are written into its graph afterwards (genai/mixed_bits.py).
        source = mixed_bits.builder_view(
            quantized.path, out_dir.parent / f".{out_dir.name}.builder-view", mixed
        )
    command = builder_command(source, out_dir, cache_dir, lay, tied, cfg.last_token_logits)
    logger.info("export_onnx: %s", " ".join(command))
    # The builder stamps producer_version with `git rev-parse HEAD` run five levels above its own
    # file: with a virtualenv inside a git checkout that is the *checkout's* commit, so model.onnx
    # changed with every commit of this repository (docs/reproducibility.md). GIT_DIR pointing
    # nowhere makes that call fail and the builder falls back to its wheel's own commit.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GIT_DIR": os.devnull}
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0 or not (out_dir / GENAI_CONFIG).is_file():
        # The log sits in the build's staging directory, which is removed on failure: keep a
        # copy in the system temp directory so the message can point at it.
        import shutil
        import tempfile

        last = _last_error(log_path)
        if _BUILDER_NOT_SUPPORTED in last:  # an architecture not in BUILDER_REFUSES yet
            raise unsupported_architecture(model_view(quantized.path).architecture, profile)
        kept = Path(tempfile.gettempdir()) / f"rslora-deploy-export-{os.getpid()}.log"
        shutil.copyfile(log_path, kept)
        raise ExportError(
            f"onnxruntime-genai builder failed (exit {proc.returncode}): {last}; full log: {kept}"
        )
    max_length = cfg.max_length or profile.max_seq_len
    _set_max_length(out_dir / GENAI_CONFIG, max_length)
    _remove_tree(cache_dir)
    protected = None
    if mixed is not None:
        _remove_tree(source)
        kind = protected_layout(cfg, lay)
        protected = mixed_bits.rewrite_protected_nodes(out_dir, quantized.path, mixed, kind)
        logger.info("export_onnx: %d protected nodes written as %s", protected["nodes"], kind)
    return Artifact(
        "onnx-genai",
        out_dir,
        {
            "builder": "onnxruntime_genai.models.builder",
            "target": profile.export_target,
            "precision": "int4",
            "accuracy_level": lay.accuracy_level,
            "lm_head": lay.lm_head,
            "lm_head_block_size": lay.lm_head_block_size if lay.lm_head_quantized else None,
            "embedding": _embedding_layout(lay, tied),
            "parity_tolerance": layout.parity_tolerance(lay),
            "max_length": max_length,
            "logits": "last position" if cfg.last_token_logits else "every position",
            "protected_8bit": protected,
        },
    )


def _embedding_layout(lay: layout.Layout, tied: bool) -> str:
    if lay.lm_head == "int4":
        return "int4, shared with lm_head" if tied else "int4"
    if lay.lm_head == "int8" or not tied:
        return "full precision"
    return "full precision, shared with lm_head"


def protected_layout(cfg: GenaiExportConfig, lay: layout.Layout) -> str:
    """``export.protected_layout``, with ``auto`` resolved for the builder target.

    On a CPU-target graph below accuracy level 4, onnxruntime 1.32 runs 8-bit ``MatMulNBits``
    without a fast kernel (a decode-size call 1.19 ms vs 0.04 ms at 4 bits; the protected demo
    package decoded 13 tok/s vs 57), so the protected modules ship as exact fp32 ``MatMul``
    (46 tok/s, +99 MB). CUDA has an 8-bit kernel, and level 4 has a fast int8 path on CPU.
    """
    if cfg.protected_layout != "auto":
        return cfg.protected_layout
    return "float" if lay.target == "cpu" and lay.accuracy_level < 4 else "nbits8"


def cpu_view(onnx_dir: Path, view_dir: Path) -> Path:
    """A folder that runs the same ``model.onnx`` on the CPU execution provider.

    A CUDA-target export names the CUDA provider in ``genai_config.json``; the graph itself (int4
    MatMulNBits, fp16 activations) also runs on CPU. Verification on a machine with no GPU links
    every file and rewrites only the provider list, so the bytes checked are the bytes shipped.
    """
    _remove_tree(view_dir)  # a second call (verify, then evaluate) rebuilds the same view
    view_dir.mkdir(parents=True)
    for item in onnx_dir.iterdir():
        if item.name != GENAI_CONFIG:
            (view_dir / item.name).symlink_to(item.resolve())
    config = json.loads((onnx_dir / GENAI_CONFIG).read_text())
    config["model"]["decoder"].setdefault("session_options", {})["provider_options"] = []
    (view_dir / GENAI_CONFIG).write_text(json.dumps(config, indent=4))
    return view_dir


def _set_max_length(path: Path, max_length: int) -> None:
    config = json.loads(path.read_text())
    config["search"]["max_length"] = max_length
    path.write_text(json.dumps(config, indent=4))


def _last_error(log_path: Path) -> str:
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
