"""Where a decode step's time and bytes go: onnxruntime's profiler on one exported folder.

For each folder given, in a child process per folder (so RSS is the session's own):

* RSS after ``InferenceSession`` creation (weights + whatever onnxruntime folds or prepacks at
  load) and the bytes of ``model.onnx.data``;
* the graph's ``Transpose`` nodes whose input is an initializer: with the builder's tied fp32
  embedding, ``lm_head.MatMul.weight [H, V]`` reaches the embedding ``Gather`` through a
  ``Transpose``. Constant folding at load turns that into a second, transposed copy
  (visible as RSS above the file size); otherwise it would run every step (visible in the
  per-op time);
* per-op-type time of ``--steps`` decode steps (one new token after a ``--past``-token KV cache,
  the shape of every generated token), from onnxruntime's profiler, and the weight bytes each
  step reads (``bench_vs_builder.bytes_per_token``).

Usage: python benchmarks/profile_decode.py FOLDER [FOLDER ...] [--steps 20] [--past 200]
Prints one JSON object per folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _feeds(session: Any, past: int, head_size: int) -> dict[str, Any]:
    import numpy as np

    feed: dict[str, Any] = {}
    for item in session.get_inputs():
        if item.name == "input_ids":
            feed[item.name] = np.array([[42]], dtype=np.int64)
        elif item.name == "attention_mask":
            feed[item.name] = np.ones((1, past + 1), dtype=np.int64)
        elif item.name == "position_ids":
            feed[item.name] = np.array([[past]], dtype=np.int64)
        elif item.name.startswith("past_key_values"):
            dtype = np.float16 if "float16" in item.type else np.float32
            shape = (1, item.shape[1], past, head_size)
            feed[item.name] = np.random.default_rng(0).standard_normal(shape).astype(dtype) * 0.1
    return feed


def profile_folder(folder: Path, steps: int, past: int) -> dict[str, Any]:
    """Run in the child: load, profile ``steps`` decode steps, aggregate per op type."""
    import onnx
    import onnxruntime as ort
    from bench_vs_builder import bytes_per_token

    rss_before = _rss_bytes()
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path("/tmp") / f"ort-profile-{folder.name}")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(folder / "model.onnx"), options)
    rss_loaded = _rss_bytes()
    config = json.loads((folder / "genai_config.json").read_text())
    head_size = int(config["model"]["decoder"]["head_size"])
    feed = _feeds(session, past, head_size)
    session.run(["logits"], feed)  # warm-up, excluded below by skipping the first run's events
    for _ in range(steps):
        session.run(["logits"], feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    first_end = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    per_op: dict[str, float] = defaultdict(float)
    for event in events:
        kernel = event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
        if kernel and event["ts"] >= first_end:
            per_op[event["args"]["op_name"]] += event["dur"] / 1e3 / steps
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    transposed = [n.name for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    step_ms = sum(r["dur"] for r in runs[1:]) / 1e3 / max(len(runs) - 1, 1)
    return {
        "folder": folder.name,
        "data_mib": round(sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 2**20, 1),
        "rss_after_load_mib": round((rss_loaded - rss_before) / 2**20, 1),
        "transposed_initializers": transposed,
        "step_ms": round(step_ms, 3),
        "per_op_ms": {k: round(v, 3) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])},
        "bytes_per_token": bytes_per_token(folder),
    }


def main() -> None:
    """Profile each folder in its own process and print the results."""
    parser = argparse.ArgumentParser()
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--past", type=int, default=200)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(profile_folder(args.folders[0], args.steps, args.past)))  # noqa: T201
        return
    for folder in args.folders:
        command = [sys.executable, __file__, str(folder), "--child", "--steps", str(args.steps),
                   "--past", str(args.past)]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True, check=True)
        print(proc.stdout.strip().splitlines()[-1])  # noqa: T201


if __name__ == "__main__":
    main()
