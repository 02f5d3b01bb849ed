"""CUDA-vs-CPU logit parity of a CUDA-target package (prepared; needs a GPU machine).

The t4-2gb package (fp16 activations, int4 ``MatMulNBits``, fp16 lm_head, ``accuracy_level`` 1)
is verified on CPU during the build. This script runs the same ``model.onnx`` with onnxruntime's
CUDA and CPU execution providers on one Brown evaluation window and reports the relative L2
error of the logits (target < 0.02 on a 256-token window, issue #12). With ``--peer`` it also
times decode of the package against a builder ``-e cuda`` export with onnxruntime-genai.

Requirements on the GPU machine: ``onnxruntime-gpu`` (and ``onnxruntime-genai-cuda`` for
``--peer``) of the versions in docs/benchmarks.md. Without the CUDA provider the script exits 2
naming what is missing; it never falls back to CPU silently.

Usage: python benchmarks/cuda_parity.py PACKAGE_DIR [--window 256] [--peer PEER_ONNX_DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _logits(model: Path, ids: np.ndarray, provider: str, head_size: int) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=[provider])
    feed: dict[str, Any] = {"input_ids": ids[None, :]}
    for item in session.get_inputs():
        if item.name == "attention_mask":
            feed[item.name] = np.ones((1, len(ids)), dtype=np.int64)
        elif item.name == "position_ids":
            feed[item.name] = np.arange(len(ids), dtype=np.int64)[None, :]
        elif item.name.startswith("past_key_values"):
            dtype = np.float16 if "float16" in item.type else np.float32
            feed[item.name] = np.zeros((1, item.shape[1], 0, head_size), dtype=dtype)
    return np.asarray(session.run(["logits"], feed)[0][0], dtype=np.float32)


def parity(package: Path, window: int) -> dict[str, Any]:
    """Relative L2 logit error CUDA vs CPU on one evaluation window."""
    import onnxruntime as ort

    from rslora_deploy.evaluation.quality import _tokenizer, eval_windows

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit(f"error: onnxruntime {ort.__version__} has no CUDA provider; install it (-gpu)")
    onnx_dir = package / "model" if (package / "model").is_dir() else package
    config = json.loads((onnx_dir / "genai_config.json").read_text())
    head_size = int(config["model"]["decoder"]["head_size"])
    ids = eval_windows(_tokenizer(onnx_dir), 1, window).input_ids[0]
    cuda = _logits(onnx_dir / "model.onnx", ids, "CUDAExecutionProvider", head_size)
    cpu = _logits(onnx_dir / "model.onnx", ids, "CPUExecutionProvider", head_size)
    error = float(np.linalg.norm(cuda - cpu) / np.linalg.norm(cpu))
    return {"window": window, "relative_l2_cuda_vs_cpu": error, "ok": error < 0.02}


def main() -> None:
    """Command line entry."""
    parser = argparse.ArgumentParser()
    parser.add_argument("package", type=Path)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--peer", type=Path, default=None)
    args = parser.parse_args()
    report = parity(args.package, args.window)
    if args.peer is not None:
        from rslora_deploy.exporters.genai.smoke import smoke_generate

        onnx_dir = args.package / "model" if (args.package / "model").is_dir() else args.package
        for name, folder in (("ours", onnx_dir), ("peer_builder_cuda", args.peer)):
            runs = [smoke_generate(folder, max_new_tokens=128, max_length=1024) for _ in range(3)]
            report[name] = sorted(r["decode_tokens_per_second"] for r in runs)[1]
    print(json.dumps(report, indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
