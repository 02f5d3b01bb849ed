"""onnxruntime-genai smoke test: load the exported package and generate from a prompt.

Runs in a child process so that its peak RSS is the runtime's own (model + KV cache + arena), not
ours; that number goes into the budget report next to the estimate. A CUDA-target export is run
through :func:`rslora_deploy.exporters.genai.builder.cpu_view` on machines without a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from rslora_deploy.errors import ExportValidationError
from rslora_deploy.exporters.base import DEFAULT_PROMPT


def smoke_generate(
    onnx_dir: Path,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 24,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Greedy generation in a child process; returns text, token counts, speed and peak RSS.

    ``max_length`` (default: the folder's ``genai_config.json``) sizes the KV cache, which
    onnxruntime-genai preallocates in full; generation still stops after ``max_new_tokens``, so
    the peak RSS covers a full-length cache at the cost of a few tokens.

    Raises:
        ExportValidationError: the runtime could not load or run the model.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "rslora_deploy.exporters.genai.smoke", str(onnx_dir), prompt,
         str(max_new_tokens), str(max_length or 0)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExportValidationError(
            f"onnxruntime-genai could not run the exported model in {onnx_dir}: {tail[:300]}"
        )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _peak_rss_bytes() -> int:
    """Peak RSS of this process's own address space.

    ``/proc/self/status`` VmHWM, not ``ru_maxrss``: on Linux ru_maxrss survives ``exec`` and so
    reports the parent's size at ``fork`` time (a 4 GB test process made a 450 MB model look like
    4 GB). VmHWM belongs to the new address space created by ``exec``.
    """
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(onnx_dir: str, prompt: str, max_new_tokens: int, max_length: int) -> dict[str, Any]:
    import time

    import onnxruntime_genai as og

    rss_before = _peak_rss_bytes()
    model = og.Model(onnx_dir)
    tokenizer = og.Tokenizer(model)
    prompt_ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    if max_length:
        params.set_search_options(do_sample=False, max_length=max_length)
    else:
        params.set_search_options(do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt_ids)
    first = time.perf_counter()
    for _ in range(max_new_tokens):
        if generator.is_done():
            break
        generator.generate_next_token()
    end = time.perf_counter()
    sequence = generator.get_sequence(0)
    new_tokens = len(sequence) - len(prompt_ids)
    return {
        "prompt": prompt,
        "text": tokenizer.decode(sequence),
        "new_tokens": int(new_tokens),
        "prefill_seconds": round(first - start, 4),
        "decode_tokens_per_second": round(new_tokens / max(end - first, 1e-9), 2),
        "peak_rss_bytes": _peak_rss_bytes(),
        "rss_before_load_bytes": rss_before,
        "kv_max_length": max_length or None,
        "runtime": f"onnxruntime-genai {og.__version__}",
    }


if __name__ == "__main__":
    # The parent reads the last stdout line as the report (a child process protocol, not a log).
    sys.stdout.write(
        json.dumps(_child(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))) + "\n"
    )
