"""The child process of ``budget --measure``: one probe, its readings as JSON on stdout.

Each probe runs in a fresh process so that its readings are its own (``python -m
rslora_deploy.memory.probe '{"probe": ..., ...}'``):

* ``context``: the runtime with nothing loaded: ``onnxruntime_genai`` and ``onnxruntime`` imported
  and an onnxruntime session of a one-node graph (``Identity``) on the device's provider, run once.
  That is what the runtime costs before any model (CUDA context, provider, arena, the
  interpreter); the profile's ``reserved_bytes`` is taken from it.
* ``worst``: the package run the way the worst user runs it: a prompt of ``max_length - 16``
  tokens (prefill: the largest activations and attention scores), then greedy decoding to
  ``max_length`` (the KV cache full), with ``min_length`` set so an early end-of-sequence cannot
  cut it short.

On CPU the reading is the peak RSS of the child (VmHWM); on CUDA / Ascend the device's used memory
is sampled every few ms on a thread and the reading taken before the probe touched the device is
subtracted (:mod:`rslora_deploy.memory.readers`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rslora_deploy.memory.readers import CpuReader, MemoryReader, PeakSampler, open_reader

#: Tokens decoded after the prompt in the worst-case probe (the issue's protocol).
DECODE_TOKENS = 16
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "npu": "CANNExecutionProvider",
}
_FILLER = (
    "The committee met on Tuesday to discuss the budget for the coming year, and the members "
    "agreed that the river crossing should be repaired before the winter rains began. "
)


def one_node_graph(path: Path) -> Path:
    """Write the context probe's graph (one ``Identity``) to ``path``.

    Written by the parent, so the probe itself never imports ``onnx`` (which would add its own
    RSS to the context reading).
    """
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "context", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def context_probe(kind: str, graph: str, reader: MemoryReader | None = None) -> dict[str, Any]:
    """Readings of the runtime alone: imports plus a one-node session on ``kind``'s provider."""
    import numpy as np

    reader = reader or open_reader(kind)
    with PeakSampler(reader) as sampler:
        import onnxruntime as ort
        import onnxruntime_genai  # noqa: F401  (the runtime the package runs on)

        session = ort.InferenceSession(graph, providers=[PROVIDERS[kind]])
        session.run(None, {"x": np.ones(1, dtype=np.float32)})
    peak = CpuReader().peak_bytes() if kind == "cpu" else sampler.added_bytes
    return {"probe": "context", "peak_bytes": peak, **_versions()}


def _prompt_ids(tokenizer: Any, length: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < length:
        ids.extend(int(t) for t in tokenizer.encode(_FILLER))
    return ids[:length]


def worst_probe(
    kind: str, onnx_dir: str, max_length: int, reader: MemoryReader | None = None
) -> dict[str, Any]:
    """Prefill ``max_length - 16`` tokens, decode to ``max_length``; readings after each phase.

    ``reader`` defaults to the device's own (tests pass a fake NVML-backed one).
    """
    reader = reader or open_reader(kind)
    cpu = CpuReader()

    def reading(sampler: PeakSampler) -> int:
        sampler.mark()
        return cpu.peak_bytes() if kind == "cpu" else sampler.added_bytes

    with PeakSampler(reader) as sampler:
        import onnxruntime_genai as og

        model = og.Model(onnx_dir)
        tokenizer = og.Tokenizer(model)
        after_load = reading(sampler)
        # Load and run peak apart: on CPU the load's high-water mark would hide a smaller run.
        run_window = kind == "cpu" and cpu.reset_peak()
        if kind != "cpu":
            sampler.peak_bytes = sampler.reader.used_bytes()
        prompt = _prompt_ids(tokenizer, max_length - DECODE_TOKENS)
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=max_length, min_length=max_length)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)
        prefill_seconds = time.perf_counter() - start
        after_prefill = reading(sampler)
        while not generator.is_done():
            generator.generate_next_token()
        length = len(generator.get_sequence(0))
    run_peak = cpu.peak_bytes() if kind == "cpu" else sampler.added_bytes
    if kind == "cpu" and not run_window:
        run_peak = max(run_peak, after_load)  # no reset: VmHWM already covers the load
    return {
        "probe": "worst",
        "prompt_tokens": len(prompt),
        "final_length": int(length),
        "load_peak_bytes": after_load,
        "run_peak_bytes": run_peak,
        "after_prefill_bytes": after_prefill,
        "peak_bytes": max(after_load, run_peak),
        "prefill_seconds": round(prefill_seconds, 3),
        "samples": sampler.samples,
        **_versions(),
    }


def _versions() -> dict[str, Any]:
    import onnxruntime as ort
    import onnxruntime_genai as og

    return {"runtime": {"onnxruntime-genai": og.__version__, "onnxruntime": ort.__version__}}


def main(argv: list[str]) -> dict[str, Any]:
    """Run the probe named in the JSON argument."""
    args = json.loads(argv[0])
    if args["probe"] == "context":
        result = context_probe(args["kind"], args["graph"])
    else:
        result = worst_probe(args["kind"], str(Path(args["onnx_dir"])), int(args["max_length"]))
    result["device"] = open_reader(args["kind"]).describe()
    return result


if __name__ == "__main__":
    sys.stdout.write(json.dumps(main(sys.argv[1:])) + "\n")
