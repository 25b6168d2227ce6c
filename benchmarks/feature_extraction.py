"""Feature extraction throughput and cache size on SmolLM2 (bf16, CPU): the eager forward vs the compiled block.

The first N conversations of the bundled self-distilled set (the main job's data, max_length 1280) are tokenized and
a fresh feature cache is built twice in temporary folders, one after the other in this process: eagerly
(`compile=False`, the reference) and through `feature_forward`'s compiled decoder block (the default). The compiled
build's time includes compiling. Both caches' features are compared (relative error, and each against a float32
forward of a few rows).

    python benchmarks/feature_extraction.py [--n 1024] [--batch-tokens 8192]

Writes benchmarks/results/feature_extraction/feature_extraction.json (stamped).
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

from dovetail_infer.models.llama import LlamaModel
from dovetail_infer.models.target import load_target, spec_from_yaml
from dovetail_train.data import features as F
from dovetail_train.data.conversations import load_conversations
from dovetail_train.data.tokenize import tokenize_conversations


def float32_copy(model: LlamaModel) -> LlamaModel:
    """The target in float32 with plain linears: the reference both bf16 paths round away from."""
    with torch.device("meta"):
        ref = LlamaModel(model.config)
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=False, assign=True)
    ref.inv_freq = model.inv_freq
    return ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a.float() - b.float()).norm() / b.float().norm()), 5)


def build(target, examples, max_length: int, args, compile: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fc = F.build_feature_cache(
            target, examples, tmp, key={"max_length": max_length}, shard_rows=args.shard_rows,
            batch_tokens=args.batch_tokens, compile=compile,
        )  # fmt: skip
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        F.FeatureCache.open(fc.path, verify=True)
        verify_s = time.perf_counter() - t0
        hidden = [fc[i]["hidden"].clone() for i in range(len(fc))]
        return {"build_s": build_s, "verify_s": verify_s, "bytes": fc.nbytes, "per_token": fc.bytes_per_token}, hidden


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1024, help="conversations of the bundled self-distilled set")
    ap.add_argument("--max-length", type=int, default=1280)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--shard-rows", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "feature_extraction" / "feature_extraction.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cache = Path(os.environ.get("DOVETAIL_CACHE", str(ROOT / "data" / "cache")))
    target = load_target(spec_from_yaml(ROOT / "conf" / "target" / "smollm2_135m.yaml", cache, dtype="bfloat16"))
    convs, _ = load_conversations(ROOT / "data" / "sharegpt" / "sharegpt_smollm2_replies.jsonl", limit=args.n)
    tok = tokenize_conversations(target, convs, max_length=args.max_length)
    examples = [{"input_ids": i, "loss_mask": m} for i, m in zip(tok["input_ids"], tok["loss_mask"])]
    tokens = sum(len(e["input_ids"]) for e in examples)
    F.compute_features(target, torch.tensor([examples[0]["input_ids"]]))  # page the weights in for both

    eager, eager_h = build(target, examples, args.max_length, args, compile=False)
    compiled, comp_h = build(target, examples, args.max_length, args, compile=True)
    ref = float32_copy(target.model)
    rows = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))[:: max(1, len(examples) // 8)]
    with torch.inference_mode():
        ref_h = {i: ref(torch.tensor([examples[i]["input_ids"]]))[0] for i in rows}
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
        "eager_build_s": round(eager["build_s"], 2),
        "compiled_build_s": round(compiled["build_s"], 2),
        "eager_tokens_per_s": round(tokens / eager["build_s"], 1),
        "compiled_tokens_per_s": round(tokens / compiled["build_s"], 1),
        "speedup": round(eager["build_s"] / compiled["build_s"], 3),
        "rel_err_compiled_vs_eager": rel_err(torch.cat(comp_h), torch.cat(eager_h)),
        "rel_err_eager_vs_float32": rel_err(torch.cat([eager_h[i] for i in rows]), torch.cat(list(ref_h.values()))),
        "rel_err_compiled_vs_float32": rel_err(torch.cat([comp_h[i] for i in rows]), torch.cat(list(ref_h.values()))),
        "cache_bytes": compiled["bytes"],
        "bytes_per_token": round(compiled["per_token"], 1),
        "hidden_bytes_per_token": 2 * target.config.hidden_size,
        "open_verify_s": round(compiled["verify_s"], 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
