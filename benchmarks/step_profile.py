"""Where a target forward's time goes: bf16 eager, bf16 compiled and weight-only quantized compiled,
decoding (1 new token) and verification (k tokens).

    python benchmarks/step_profile.py [--target smollm2_135m] [--quant int4] [--context 300] [--k 1 2 3 4 9 17]

For each k: median ms of one forward (LM head included) over a `--context`-token cache, all variants side
by side (interleaved), each split by torch.profiler into weight products, attention's batched matmuls,
dynamo's guard check and the rest; and each variant's weight-streaming floor: bytes read per forward /
the memory read bandwidth measured here. Writes benchmarks/results/step_profile/step_profile.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, stamp
from torch.profiler import ProfilerActivity, profile

from dovetail_infer.compiled import CompiledForward
from dovetail_infer.kv_cache import KVCache
from dovetail_infer.models.linear import PackedLinear, QuantLinear
from dovetail_infer.models.llama import RMSNorm
from dovetail_infer.models.target import load_target, spec_from_yaml


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


WEIGHT_OPS = ("mkldnn::_linear_pointwise", "aten::linear", "aten::mm", "aten::addmm")
WEIGHT_OPS += ("aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm")
ATTENTION_OPS = ("aten::bmm", "aten::matmul")  # the few-query attention's two products (the linears are above)


def step_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one forward reads: every linear (as stored: bf16, or int4/int8 plus scales) and
    norm; the embedding only for a few rows, so not counted (a tied LM head is counted as the head)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += sum(b.numel() * b.element_size() for b in (m.qweight, m.scales))
        elif isinstance(m, (PackedLinear, torch.nn.Linear)):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, RMSNorm):
            total += m.weight.numel() * m.weight.element_size()
    return total


def categorize(prof, n: int) -> dict[str, float]:
    """ms per forward by kind: weight products, attention's batched matmuls, dynamo's guard check, and the
    rest (inductor's fused C++ loops run inside the graph call and count there)."""
    ev = prof.key_averages()
    cats = {"weight_products": 0.0, "attention_bmm": 0.0, "guards": 0.0, "rest": 0.0}
    for e in ev:
        if e.key in WEIGHT_OPS or e.key.startswith("quantized::"):
            k = "weight_products"
        elif e.key in ATTENTION_OPS:
            k = "attention_bmm"
        elif "Cache Lookup" in e.key:
            k = "guards"
        else:
            k = "rest"
        cats[k] += e.self_cpu_time_total / 1000 / n
    return {k: round(v, 2) for k, v in cats.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2_135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant", nargs="*", default=["int4"], help="also profile these weight-only quantized targets")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4, 9, 17])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--max-autotune", action="store_true", help="also compiled with infer.compile=max-autotune")
    ap.add_argument("--out", default=str(RESULTS / "step_profile" / "step_profile"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    yaml = ROOT / "conf" / "target" / f"{args.target}.yaml"
    gbs = read_bandwidth_gbs()
    weights: dict[str, torch.nn.Module] = {}
    for quant in [None, *args.quant]:
        weights[quant or args.dtype] = load_target(
            spec_from_yaml(yaml, ROOT / "data" / "cache", dtype=args.dtype, quant=quant)
        ).model
    cfg = next(iter(weights.values())).config
    # the runs: eager and compiled on the float weights, compiled on each quantized one (and max-autotune)
    runs_of: dict[str, tuple[torch.nn.Module, str | None]] = {f"{args.dtype} eager": (weights[args.dtype], None)}
    runs_of.update({f"{w} compiled": (m, "default") for w, m in weights.items()})
    if args.max_autotune:  # the products run inside inductor's C++ kernels there: the profile counts them in "rest"
        runs_of.update({f"{w} compiled max-autotune": (m, "max-autotune") for w, m in weights.items()})
    torch.manual_seed(0)
    ctx = torch.randint(0, cfg.vocab_size, (1, args.context))
    state = {}
    with torch.no_grad():
        for name, (model, mode) in runs_of.items():
            cache = KVCache.for_model(cfg, 512, dtype=model.embed_tokens.weight.dtype)  # the engine's size here
            model(ctx, cache=cache, start=0)
            state[name] = (model, CompiledForward(model, mode=mode) if mode else model, cache)
        rows = []
        for k in args.k:
            ids = torch.randint(0, cfg.vocab_size, (1, k))
            fns = {
                name: (lambda m=m, f=f, c=c, ids=ids: m.logits(f(ids, cache=c, start=args.context)))
                for name, (m, f, c) in state.items()
            }
            for fn in fns.values():
                fn()  # compiles this bucket (timed separately)
            ms = {name: [] for name in fns}
            for _ in range(3):  # interleaved passes: machine noise hits all alike
                for name, fn in fns.items():
                    ms[name].append(timed(fn, max(args.iters // 3, 1)))
            row = {"k": k, "ms": {name: round(statistics.median(v), 2) for name, v in ms.items()}, "profile": {}}
            for name, fn in fns.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(5):
                        fn()
                row["profile"][name] = categorize(prof, 5)
            rows.append(row)
            print(row, flush=True)
    result = {
        **stamp(),
        "target": args.target,
        "dtype": args.dtype,
        "context": args.context,
        "threads": args.threads,
        "read_bandwidth_gb_s": round(gbs, 1),
        "weights": {
            w: {"step_mb": round(step_bytes(m) / 2**20, 1), "floor_ms": round(step_bytes(m) / (gbs * 1e9) * 1e3, 2)}
            for w, m in weights.items()
        },
        "compile_s": {
            name: round(f.compile_s, 1) for name, (_, f, _) in state.items() if isinstance(f, CompiledForward)
        },
        "rows": rows,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    names = list(runs_of)
    lines = [
        f"{args.target}, {args.threads} threads, context {args.context}, read bandwidth {result['read_bandwidth_gb_s']} GB/s; "
        + "; ".join(
            f"{w}: {v['step_mb']} MB read per forward, floor {v['floor_ms']} ms" for w, v in result["weights"].items()
        ),
        "",
        "ms per forward (incl. the LM head over the k rows); in brackets: weight products / attention bmm / guard check / rest",
        "",
        "| k | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for r in rows:
        cells = []
        for n in names:
            p = r["profile"][n]
            cells.append(
                f"{r['ms'][n]:.1f} ({p['weight_products']:.1f} / {p['attention_bmm']:.1f} / {p['guards']:.1f} / {p['rest']:.1f})"
            )
        lines.append(f"| {r['k']} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
