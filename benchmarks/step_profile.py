"""Where a target forward's time goes: eager vs torch.compile'd, decoding (1 new token) and verification (k).

    python benchmarks/step_profile.py [--target smollm2_135m] [--context 300] [--k 1 4 8 16] [--iters 30]

For each k: median ms of one forward over a `--context`-token cache, eager and compiled side by side
(interleaved), plus the eager step's time per operator kind from torch.profiler (matrix products vs the
rest), and the weight-streaming floor: weight bytes / the memory read bandwidth measured here on one
large copy. Writes benchmarks/results/step_profile.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dovetail_infer.compiled import CompiledForward
from dovetail_infer.kv_cache import KVCache
from dovetail_infer.models.target import load_target, spec_from_yaml

ROOT = Path(__file__).resolve().parents[1]
GEMM_OPS = ("mkldnn::_linear_pointwise", "aten::linear", "aten::mm", "aten::matmul", "aten::bmm", "aten::addmm")


def read_bandwidth_gbs(mb: int = 512, reps: int = 5) -> float:
    """Read bandwidth from summing a buffer far larger than the caches (one pass reads every byte)."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / min(times) / 1e9


def timed(fn, iters: int) -> float:
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2_135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_profile"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = spec_from_yaml(ROOT / "conf" / "target" / f"{args.target}.yaml", ROOT / "data" / "cache", dtype=args.dtype)
    target = load_target(spec)
    model, cfg = target.model, target.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if cfg.tie_word_embeddings:  # the tied LM head is read once per step, the embedding only for a few rows
        weight_bytes -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
        weight_bytes += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    gbs = read_bandwidth_gbs()
    floor_ms = weight_bytes / (gbs * 1e9) * 1000
    # 512 slots: the size the engine allocates for these lengths
    caches = {name: KVCache.for_model(cfg, 512, dtype=target.dtype) for name in ("eager", "compiled")}
    comp = CompiledForward(model)
    torch.manual_seed(0)
    ctx = torch.randint(0, cfg.vocab_size, (1, args.context))
    rows = []
    with torch.no_grad():
        for c in caches.values():
            model(ctx, cache=c, start=0)
        for k in args.k:
            ids = torch.randint(0, cfg.vocab_size, (1, k))
            runs = {
                "eager": lambda ids=ids: model.logits(model(ids, cache=caches["eager"], start=args.context)),
                "compiled": lambda ids=ids: model.logits(comp(ids, cache=caches["compiled"], start=args.context)),
            }
            runs["compiled"]()  # compile this bucket (timed separately)
            ms = {name: [] for name in runs}
            for _ in range(3):  # interleaved passes: machine noise hits both alike
                for name, fn in runs.items():
                    ms[name].append(timed(fn, max(args.iters // 3, 1)))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    runs["eager"]()
            ev = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in ev)
            gemm = sum(e.self_cpu_time_total for e in ev if e.key in GEMM_OPS)
            n_ops = sum(e.count for e in ev) / 5
            top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:6]
            rows.append(
                {
                    "k": k,
                    "eager_ms": round(statistics.median(ms["eager"]), 2),
                    "compiled_ms": round(statistics.median(ms["compiled"]), 2),
                    "eager_gemm_share": round(gemm / total, 3) if total else None,
                    "eager_ops_per_forward": round(n_ops),
                    "eager_top_ops": [(e.key, round(e.self_cpu_time_total / total, 3)) for e in top],
                }
            )
            print(rows[-1], flush=True)
        compile_s = comp.compile_s
    result = {
        "target": args.target,
        "dtype": args.dtype,
        "context": args.context,
        "threads": args.threads,
        "weight_mb": round(weight_bytes / 2**20, 1),
        "read_bandwidth_gb_s": round(gbs, 1),
        "weight_streaming_floor_ms": round(floor_ms, 2),
        "compile_s": round(compile_s, 1),
        "rows": rows,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        f"{args.target} {args.dtype}, {args.threads} threads, context {args.context}: weights {result['weight_mb']} MB, "
        f"read bandwidth {result['read_bandwidth_gb_s']} GB/s → floor {result['weight_streaming_floor_ms']} ms/forward",
        "",
        "| new tokens k | eager ms | compiled ms | compiled speedup | eager GEMM share | eager profiler events/forward |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | {r['eager_ms'] / r['compiled_ms']:.2f}× "
            f"| {r['eager_gemm_share']:.0%} | {r['eager_ops_per_forward']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
