#!/usr/bin/env python3
"""Greedy generation with the package's fixed-length KV-buffer decoder (ONNX Runtime or pyACL).

Self-contained: it needs numpy plus onnxruntime (``decoder.onnx``; CANN EP when installed, else
CPU) or pyACL (``acl``, on a compiled ``.om``), and optionally ``tokenizers`` for text in/out.
Everything it knows about the graph comes from ``io_spec.json`` beside it, so it doubles as the
reference for anyone writing another runner.

The loop (one KV buffer per layer, ``[1, kv_heads, KV, head_dim]`` fp16):

* prefill: the prompt is cut into chunks of at most the largest gear; each chunk is LEFT-padded to
  the smallest gear that holds it (pads: token ``pad_token_id``, position 0, attention 0), so the
  graph's last position, whose logits it returns, is always a real token;
* ``attention_mask`` is ``[buffer slots filled ; chunk's real tokens]`` of length KV + S; buffer
  slot ``p`` holds position ``p``;
* the graph returns the chunk's S new K/V entries; the real ones are copied into the buffer at
  the next free slots (one contiguous copy per layer);
* decode: one token at a time (gear 1), greedy argmax, until an EOS id, ``max_new_tokens`` or a
  full buffer.

Usage: ``python ascend_runner.py --package DIR --prompt "text" [--max-new-tokens 32]
[--backend auto|onnxruntime|acl] [--soc Ascend310P3]``; prints one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SPEC_FILE = "io_spec.json"


class OrtBackend:
    """``decoder.onnx`` through ONNX Runtime (CANN EP first when it is available)."""

    def __init__(self, package: Path, spec: dict[str, Any], providers: list[str] | None = None):
        import onnxruntime as ort

        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CANNExecutionProvider",) if p in available]
            providers.append("CPUExecutionProvider")
        options = ort.SessionOptions()
        self.session = ort.InferenceSession(
            str(package / spec["model"]), sess_options=options, providers=providers
        )
        self.name = f"onnxruntime {ort.__version__} {self.session.get_providers()[0]}"

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One graph call; outputs in io_spec order."""
        return list(self.session.run(None, feeds))

    def close(self) -> None:
        """Nothing to release."""


class AclBackend:
    """The ATC-compiled ``.om`` through pyACL (CANN), one static graph per gear (dynamic_dims).

    Written against the pyACL API of CANN 7/8 (``acl.mdl.set_input_dynamic_dims``); it cannot
    be run on a machine without an Ascend NPU, so it is unverified here (docs/ascend.md).
    """

    def __init__(self, package: Path, spec: dict[str, Any], soc: str, device_id: int = 0):
        import acl  # noqa: PLC0415 - only on Ascend hosts

        self.acl, self.spec, self.device_id = acl, spec, device_id
        om = package / spec["om"][soc]
        _check(acl.init(), "acl.init")
        _check(acl.rt.set_device(device_id), "acl.rt.set_device")
        self.context, ret = acl.rt.create_context(device_id)
        _check(ret, "acl.rt.create_context")
        self.memory = {"before_load": acl_memory(acl)}
        self.model_id, ret = acl.mdl.load_from_file(str(om))
        _check(ret, f"acl.mdl.load_from_file({om})")
        self.memory["after_load"] = acl_memory(acl)
        self.desc = acl.mdl.create_desc()
        _check(acl.mdl.get_desc(self.desc, self.model_id), "acl.mdl.get_desc")
        self.name = f"pyACL {soc} {om.name}"
        self._in = [self._alloc(acl.mdl.get_input_size_by_index(self.desc, i))
                    for i in range(acl.mdl.get_num_inputs(self.desc))]  # fmt: skip
        self._out = [self._alloc(acl.mdl.get_output_size_by_index(self.desc, i))
                     for i in range(acl.mdl.get_num_outputs(self.desc))]  # fmt: skip

    def _alloc(self, size: int) -> tuple[int, int]:
        ptr, ret = self.acl.rt.malloc(size, 0)  # ACL_MEM_MALLOC_HUGE_FIRST
        _check(ret, "acl.rt.malloc")
        return ptr, size

    def _dataset(self, buffers: list[tuple[int, int]]) -> Any:
        dataset = self.acl.mdl.create_dataset()
        for ptr, size in buffers:
            self.acl.mdl.add_dataset_buffer(dataset, self.acl.create_data_buffer(ptr, size))
        return dataset

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Copy inputs to the device, pick the gear, execute, copy outputs back."""
        acl = self.acl
        names = [i["name"] for i in self.spec["inputs"]]
        for (ptr, _), name in zip(self._in, names, strict=False):
            array = np.ascontiguousarray(feeds[name])
            src = acl.util.bytes_to_ptr(array.tobytes())
            _check(acl.rt.memcpy(ptr, array.nbytes, src, array.nbytes, 1), "memcpy h2d")
        inputs, outputs = self._dataset(self._in), self._dataset(self._out)
        seq = int(feeds["input_ids"].shape[1])
        index, ret = acl.mdl.get_input_index_by_name(self.desc, "ascend_mbatch_shape_data")
        _check(ret, "get_input_index_by_name(ascend_mbatch_shape_data)")
        dims = [seq, seq + int(self.spec["max_length"]), seq]
        _check(acl.mdl.set_input_dynamic_dims(
            self.model_id, inputs, index, {"dimCount": len(dims), "dims": dims}
        ), "set_input_dynamic_dims")  # fmt: skip
        _check(acl.mdl.execute(self.model_id, inputs, outputs), "acl.mdl.execute")
        result = []
        for (ptr, _), out in zip(self._out, self.spec["outputs"], strict=False):
            shape = [seq if d == "S" else d for d in out["shape"]]
            nbytes = int(np.prod(shape)) * np.dtype(out["dtype"]).itemsize
            host = np.empty(shape, dtype=out["dtype"])
            dst = acl.util.numpy_to_ptr(host)
            _check(acl.rt.memcpy(dst, nbytes, ptr, nbytes, 2), "memcpy d2h")
            result.append(host)
        return result

    def close(self) -> None:
        """Unload the model and release the device."""
        self.acl.mdl.unload(self.model_id)
        self.acl.rt.destroy_context(self.context)
        self.acl.rt.reset_device(self.device_id)
        self.acl.finalize()


def _check(ret: int, what: str) -> None:
    if ret != 0:
        raise RuntimeError(f"{what} failed with ACL error {ret}")


def acl_memory(acl: Any) -> dict[str, int] | None:
    """Device memory (free, total) from ACL, or None where the call is unavailable."""
    try:
        free, total, ret = acl.rt.get_mem_info(1)  # ACL_HBM_MEM
    except (AttributeError, TypeError):
        return None
    return {"free_bytes": int(free), "total_bytes": int(total)} if ret == 0 else None


def npu_memory() -> dict[str, Any] | None:
    """NPU memory through torch_npu when it imports and a device is present, else None.

    torch_npu installed without CANN breaks ``import torch`` itself (RuntimeError) or raises
    ImportError: both mean "no NPU here".
    """
    if importlib.util.find_spec("torch_npu") is None:
        return None
    try:
        import torch
        import torch_npu  # noqa: F401

        # torch_npu registers torch.npu when imported; torch's own type hints do not know it.
        npu = torch.npu  # type: ignore[attr-defined]
        if not npu.is_available():
            return None
        free, total = npu.mem_get_info()
        return {
            "free_bytes": int(free),
            "total_bytes": int(total),
            "max_allocated_bytes": int(npu.max_memory_allocated()),
        }
    except (ImportError, RuntimeError):
        return None


class KVRunner:
    """The KV-buffer loop over any backend with ``run(feeds) -> outputs``."""

    def __init__(self, spec: dict[str, Any], backend: Any):
        self.spec, self.backend = spec, backend
        kv = spec["kv"]
        self.layers, self.kv_len = int(kv["layers"]), int(spec["max_length"])
        self.gears = sorted(int(g) for g in spec["gears"])
        self.pad = int(spec.get("pad_token_id", 0))
        self.names = [i["name"] for i in spec["inputs"]]
        self.reset()

    def reset(self) -> None:
        """Empty buffers."""
        shape = self.spec["kv"]["shape"]
        self.buffers = [np.zeros(shape, dtype=np.float16) for _ in range(2 * self.layers)]
        self.filled = 0

    def _gear(self, n: int) -> int:
        return next(g for g in self.gears if g >= n)

    def feed(self, tokens: list[int]) -> np.ndarray:
        """Run ``tokens`` (one chunk of at most the largest gear); returns last logits [vocab]."""
        n = len(tokens)
        if self.filled + n > self.kv_len:
            raise ValueError(f"KV buffer full: {self.filled} + {n} > {self.kv_len}")
        gear = self._gear(n)
        pad = gear - n
        ids = np.full((1, gear), self.pad, dtype=np.int64)
        ids[0, pad:] = tokens
        pos = np.zeros((1, gear), dtype=np.int64)
        pos[0, pad:] = np.arange(self.filled, self.filled + n)
        mask = np.zeros((1, self.kv_len + gear), dtype=np.int64)
        mask[0, : self.filled] = 1
        mask[0, self.kv_len + pad :] = 1
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        for name, buf in zip(self.names[3:], self.buffers, strict=False):
            feeds[name] = buf
        outputs = self.backend.run(feeds)
        for buf, new in zip(self.buffers, outputs[1:], strict=False):
            buf[:, :, self.filled : self.filled + n, :] = new[:, :, pad:, :]
        self.filled += n
        return np.asarray(outputs[0], dtype=np.float32).reshape(-1)

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Feed the prompt in chunks of at most the largest gear; returns the last logits."""
        step = self.gears[-1]
        logits = np.zeros(0, dtype=np.float32)
        for start in range(0, len(tokens), step):
            logits = self.feed(tokens[start : start + step])
        return logits

    def generate(
        self, prompt: list[int], max_new_tokens: int, stop_at_eos: bool = True
    ) -> list[int]:
        """Greedy continuation of ``prompt`` (new tokens only, EOS included if produced)."""
        self.reset()
        eos = set(self.spec.get("eos_token_ids", [])) if stop_at_eos else set()
        logits = self.prefill(prompt)
        out: list[int] = []
        while len(out) < max_new_tokens:
            token = int(np.argmax(logits))
            out.append(token)
            if token in eos or self.filled >= self.kv_len:
                break
            logits = self.feed([token])
        return out

    def score(self, tokens: list[int]) -> np.ndarray:
        """Logits after each token, fed one at a time (teacher forcing): ``[len, vocab]``."""
        self.reset()
        return np.stack([self.feed([t]) for t in tokens])


def peak_rss_bytes() -> int | None:
    """This process's peak RSS (Linux VmHWM), or None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def make_backend(package: Path, spec: dict[str, Any], kind: str, soc: str | None) -> Any:
    """``acl`` when asked (or ``auto`` and acl imports and an .om exists), else onnxruntime."""
    if kind in ("auto", "acl") and importlib.util.find_spec("acl") is not None:
        soc = soc or spec.get("default_soc") or next(iter(spec.get("om", {})), None)
        if soc and (package / spec.get("om", {}).get(soc, "-")).is_file():
            return AclBackend(package, spec, soc)
    if kind == "acl":
        raise SystemExit("error: backend acl needs pyACL (CANN) and a compiled .om (atc/)")
    return OrtBackend(package, spec)


def _tokenizer(package: Path) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    path = package / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    """Command line: generate from a prompt (text or ids) and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--ids", default=None, help="comma-separated token ids")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--backend", choices=("auto", "onnxruntime", "acl"), default="auto")
    parser.add_argument("--ignore-eos", action="store_true", help="always max-new-tokens")
    parser.add_argument("--soc", default=None, help="which .om (Ascend310P3, Ascend310B1, ...)")
    args = parser.parse_args(argv)
    model_dir = args.package / "model" if (args.package / "model").is_dir() else args.package
    spec = json.loads((model_dir / SPEC_FILE).read_text())
    tok = _tokenizer(model_dir)
    if args.ids:
        prompt = [int(t) for t in args.ids.split(",")]
    elif args.prompt is not None and tok is not None:
        prompt = tok.encode(args.prompt).ids
    else:
        raise SystemExit("error: pass --ids, or --prompt with the tokenizers package installed")
    backend = make_backend(model_dir, spec, args.backend, args.soc)
    runner = KVRunner(spec, backend)
    start = time.perf_counter()
    runner.prefill(prompt)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    new = runner.generate(prompt, args.max_new_tokens, stop_at_eos=not args.ignore_eos)
    total_s = time.perf_counter() - start
    decode_s = max(total_s - prefill_s, 1e-9)
    result = {
        "backend": backend.name,
        "prompt_ids": prompt,
        "new_ids": new,
        "text": tok.decode(prompt + new) if tok is not None else None,
        "prefill_seconds": round(prefill_s, 4),
        "decode_tokens_per_second": round(max(len(new) - 1, 0) / decode_s, 2),
        "npu_memory": getattr(backend, "memory", None) or npu_memory(),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    backend.close()
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
