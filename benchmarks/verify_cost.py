"""What a target forward of k new tokens costs at a fixed context: T(k), T(k)/T(1) and tokens/s.

Speculative decoding pays off when verifying k drafted tokens costs little more than decoding one; for a
memory-bound target T(k)/T(1) stays near 1 while the weights, not the arithmetic, set the time. The forward is
the verification one (k new tokens over a KV cache of `--context` positions, causal, plus the LM head), eager.
The cache is filled with random keys and values instead of a timed prefill (the cost does not depend on them).

    python benchmarks/verify_cost.py --target llama2_7b_shape --quant int4 --k 1 2 4 8 16 32 --context 512 \\
        --out benchmarks/results/verify_cost/llama2_7b_shape_int4.json

`--quant bf16` converts the shape's Q4_0 GGUF once into dense bfloat16 shards in the cache (13.5 GB for the 7B
shape, on disk) and maps them: the weights are the shards' file pages (`rss_file_mb`), held once, with no float32
copy (`rss_anon_mb` stays small). Its values are Q4_0's dequantized ones; a forward's cost does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, stamp

from dovetail_infer.evaluate import peak_rss_mb
from dovetail_infer.kv_cache import KVCache
from dovetail_infer.models.target import load_target, spec_from_yaml

QUANTS = {"bf16": None, "int8": "int8", "int4": "int4"}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_split_mb() -> dict[str, float]:
    """Resident memory by kind: anonymous (heap, copies) and file-backed (mapped weights, libraries)."""
    keys = {"RssAnon": "rss_anon_mb", "RssFile": "rss_file_mb"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in keys:
            out[keys[key]] = round(int(line.split()[1]) / 1024, 1)
    return out


def target_spec(target: str, quant: str, cache_dir: str | None) -> dict:
    """The spec of a conf/target/<target>.yaml (or a yaml path) at one of `QUANTS`."""
    conf = Path(target) if target.endswith(".yaml") else ROOT / "conf" / "target" / f"{target}.yaml"
    return spec_from_yaml(conf, cache_dir, quant=QUANTS[quant])


@torch.no_grad()
def time_forward(model, cache: KVCache, k: int, context: int, repeats: int, warmup: int, gen: torch.Generator) -> float:
    """Median ms of one forward of k new tokens at positions context..context+k-1, LM head included."""
    ids = torch.randint(0, model.config.vocab_size, (1, k), generator=gen)
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        model.logits(model(ids, cache=cache, start=context))
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="llama2_7b_shape", help="a conf/target/<name>.yaml name, or a yaml path")
    ap.add_argument("--quant", choices=sorted(QUANTS), default="int4")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--cache-dir", default=None, help="default: DOVETAIL_CACHE or ~/.cache/dovetail")
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/verify_cost/<target>_<quant>)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = target_spec(args.target, args.quant, args.cache_dir)
    args.target = spec["name"]
    t0 = time.perf_counter()
    target = load_target(spec)
    load_s = time.perf_counter() - t0
    rss_loaded, peak_loaded = rss_mb(), peak_rss_mb()
    gguf = json.loads((target.folder / "source.json").read_text())["gguf"] if target.folder else None
    model, cfg = target.model, target.config
    print(
        f"{args.target} ({'a random-weight shape' if spec['source'] == 'shape' else spec['source']}), {args.quant}: "
        f"loaded in {load_s:.1f} s, RSS {rss_loaded:.0f} MB (peak {peak_loaded:.0f} MB)"
    )

    cache = KVCache.for_model(cfg, args.context + max(args.k), dtype=target.dtype)
    gen = torch.Generator().manual_seed(0)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=gen))
    cache.length = args.context
    ms = {}
    for k in args.k:
        ms[str(k)] = round(time_forward(model, cache, k, args.context, args.repeats, args.warmup, gen), 2)
        print(f"k={k:3d}: {ms[str(k)]:9.1f} ms  T(k)/T(1) {ms[str(k)] / ms[str(args.k[0])]:.2f}")
    base = ms[str(min(args.k))]
    result = {
        "target": args.target,
        "shape": spec["source"] == "shape",
        "quant": args.quant,
        "dtype": str(target.dtype).removeprefix("torch."),
        "context": args.context,
        "ms": ms,
        "ratio": {k: round(v / base, 3) for k, v in ms.items()},
        "tokens_per_s": round(1e3 / base, 3),
        "tokens_per_s_by_k": {k: round(int(k) * 1e3 / v, 2) for k, v in ms.items()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_rss_load_mb": round(peak_loaded, 1),
        "rss_loaded_mb": round(rss_loaded, 1),
        **rss_split_mb(),  # after the last forward: every weight touched
        "load_s": round(load_s, 2),
        "gguf": Path(gguf).name if gguf else None,
        "gguf_mb": round(Path(gguf).stat().st_size / 2**20, 1) if gguf else None,
        "kv_cache_mb": round(cache.nbytes / 2**20, 1),
        "repeats": args.repeats,
        "warmup": args.warmup,
        **stamp(),
    }
    out = Path(args.out) if args.out else RESULTS / "verify_cost" / f"{args.target}_{args.quant}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
