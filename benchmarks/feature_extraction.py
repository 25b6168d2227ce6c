"""Feature extraction throughput and cache size on SmolLM2 (bf16, CPU).

The target first writes replies for the first N embedded prompts (`regenerate`, cached under the data cache,
so reruns skip it), the chats are tokenized, and a fresh feature cache is built in a temporary folder.
Usage: python benchmarks/feature_extraction.py [--n 64] [--new 96] [--batch-tokens 8192]
Writes benchmarks/results/feature_extraction/feature_extraction.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, stamp

from dovetail_infer.models.target import load_target, spec_from_yaml
from dovetail_train.data import features as F
from dovetail_train.data.conversations import load_conversations
from dovetail_train.data.regenerate import regenerate
from dovetail_train.data.tokenize import tokenize_conversations


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--new", type=int, default=96, help="max_new_tokens of the regenerated replies")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--shard-rows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "feature_extraction" / "feature_extraction.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cache = Path(os.environ.get("DOVETAIL_CACHE", str(ROOT / "data" / "cache")))
    target = load_target(spec_from_yaml(ROOT / "conf" / "target" / "smollm2_135m.yaml", cache, dtype="bfloat16"))
    convs, _ = load_conversations(ROOT / "data" / "prompts" / "dovetail_prompts.jsonl", limit=args.n)
    t0 = time.perf_counter()
    convs = regenerate(target, convs, cache / "regen", max_new_tokens=args.new, batch_size=32)
    regen_s = time.perf_counter() - t0
    examples = tokenize_conversations(target, convs, max_length=args.max_length)
    examples = [{"input_ids": i, "loss_mask": m} for i, m in zip(examples["input_ids"], examples["loss_mask"])]
    tokens = sum(len(e["input_ids"]) for e in examples)

    forward_s = [0.0]
    real = F.compute_features

    def timed(t, ids):
        s = time.perf_counter()
        out = real(t, ids)
        forward_s[0] += time.perf_counter() - s
        return out

    F.compute_features = timed
    F.compute_features(target, torch.tensor([examples[0]["input_ids"]]))  # warm up
    forward_s[0] = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fc = F.build_feature_cache(
            target, examples, tmp, key={"max_length": args.max_length}, shard_rows=args.shard_rows,
            batch_tokens=args.batch_tokens,
        )  # fmt: skip
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        F.FeatureCache.open(fc.path, verify=True)
        open_verify_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fc = F.FeatureCache.open(fc.path, verify=False)
        rows = [fc[i] for i in range(len(fc))]
        read_s = time.perf_counter() - t0
        result = {
            **stamp(),
            "target": "smollm2_135m",
            "dtype": "bfloat16",
            "storage_dtype": "bfloat16",
            "threads": args.threads,
            "load_avg": os.getloadavg()[0],
            "examples": len(examples),
            "tokens": tokens,
            "mean_length": round(tokens / len(examples), 1),
            "batch_tokens": args.batch_tokens,
            "shards": len(fc.manifest["shards"]),
            "regenerate_s_or_cached": round(regen_s, 1),
            "build_s": round(build_s, 2),
            "forward_s": round(forward_s[0], 2),
            "extraction_tokens_per_s": round(tokens / build_s, 1),
            "forward_tokens_per_s": round(tokens / forward_s[0], 1),
            "cache_bytes": fc.nbytes,
            "bytes_per_token": round(fc.bytes_per_token, 1),
            "hidden_bytes_per_token": 2 * target.config.hidden_size,
            "open_verify_s": round(open_verify_s, 3),
            "open_and_read_all_s": round(read_s, 3),
        }
        assert sum(r["hidden"].shape[0] for r in rows) == tokens
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
