"""Decode with a random-weight shape target (or any target yaml): its memory, and that speculation keeps its greedy
output.

Loads the target as `verify_cost.py` does (a shape's GGUF is written once and converted once into the cache), then
decodes one seeded random prompt greedily, target-only and speculatively: with a random depth-1 draft of the
target's sizes (acceptance ~0) and with an oracle draft (`gpu_check.oracle_draft`: it returns the target's own next
features, so drafts are accepted deep), each on a small tree and on a chain, full trees (`min_prob` 0). Every
speculative output must equal the target-only one. Peak RSS (`getrusage`) after loading, after target-only
decoding (the target alone, every weight touched) and at the end (with the drafts).

    python benchmarks/shape_decode.py --target llama2_7b_shape --quant int4 --new-tokens 24 \\
        --out benchmarks/results/shape_decode/llama2_7b_shape_int4.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, stamp
from gpu_check import oracle_draft
from verify_cost import QUANTS, rss_mb, rss_split_mb, target_spec

from dovetail_infer.engine import Dovetail, GenerationResult, InferConfig
from dovetail_infer.evaluate import peak_rss_mb
from dovetail_infer.models.draft import DraftConfig, DraftModel
from dovetail_infer.models.gguf_io import layout_name
from dovetail_infer.models.target import Target, load_target


def random_draft(target: Target, seed: int) -> DraftModel:
    """A depth-1 DGF draft of the target's sizes with seeded random weights, in the target's dtype."""
    torch.manual_seed(seed)
    return DraftModel(DraftConfig.from_target(target.config, depth=1, fusion="dgf")).to(target.dtype)


def first_diff(a: list[int], b: list[int]) -> int | None:
    """The first index where the two token lists differ (or one ends), None when equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.no_grad()
def top2_gap(target: Target, ids: list[int]) -> float:
    """The target's top-1 minus top-2 logit after `ids` (one uncached forward): how close a tie was."""
    logits = target.model.logits(target.model(torch.tensor([ids]))[0, -1]).float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def row(name: str, r: GenerationResult, ref: list[int], target: Target, prompt: list[int]) -> dict[str, Any]:
    """One speculative decoding against the target-only reference."""
    j = first_diff(r.output_ids, ref)
    fwd = r.forwards or 1
    out = {
        "row": name,
        "equal": j is None,
        "tau": round(r.tau, 3),
        "tokens_per_s": round(r.tokens_per_s, 3),
        "forwards": r.forwards,
        "accept_lengths": r.accept_lengths,
        "ms_per_forward": {k: round(getattr(r, f"{k}_s") / fwd * 1e3, 1) for k in ("draft", "verify", "other")},
        "decode_s": round(r.decode_s, 2),
    }
    if j is not None:  # where and how close: a near tie in the target's logits, or a real bug
        out.update(first_diff=j, ids=r.output_ids, target_top2_gap=round(top2_gap(target, prompt + ref[:j]), 4))
    return out


def load(args: argparse.Namespace) -> tuple[Target, dict[str, Any]]:
    """The target, and what loading it cost (time, peak RSS, its GGUF, whether it was converted now)."""
    spec = target_spec(args.target, args.quant, args.cache_dir)
    t0, wall0 = time.perf_counter(), time.time()
    target = load_target(spec)
    info: dict[str, Any] = {
        "load_s": round(time.perf_counter() - t0, 2),
        "peak_rss_load_mb": round(peak_rss_mb(), 1),
        "rss_loaded_mb": round(rss_mb(), 1),
    }
    source = target.folder / "source.json" if target.folder else None
    if target.spec.source != "random" and source is not None and source.exists():  # random: a tokenizer's folder
        gguf = Path(json.loads(source.read_text())["gguf"])
        layout = target.folder / "weights" / layout_name(target.spec.quant, target.spec.quant_group, target.dtype)
        info.update(
            gguf=gguf.name,
            gguf_mb=round(gguf.stat().st_size / 2**20, 1),
            gguf_written_now=gguf.stat().st_mtime >= wall0,
            converted_now=layout.exists() and layout.stat().st_mtime >= wall0,
        )
    return target, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="llama2_7b_shape", help="a conf/target/<name>.yaml name, or a yaml path")
    ap.add_argument("--quant", choices=sorted(QUANTS), default="int4")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=16, help="seeded random prompt ids (shapes have no tokenizer)")
    ap.add_argument("--tree", type=int, nargs=3, default=[4, 3, 2], metavar=("BUDGET", "DEPTH", "TOP_K"))
    ap.add_argument("--chain", type=int, default=3, help="chain length (budget = depth, top_k 1)")
    ap.add_argument("--no-oracle", action="store_true", help="only the random draft")
    ap.add_argument("--max-rss-gb", type=float, default=6.0, help="rss_ok: target-only peak RSS at most this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--cache-dir", default=None, help="default: DOVETAIL_CACHE or ~/.cache/dovetail")
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/shape_decode/<target>_<quant>)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    target, info = load(args)
    name = target.spec.name
    print(f"{name}, {args.quant}: {info}", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, target.config.vocab_size, (args.prompt_len,), generator=gen).tolist()
    n = args.new_tokens
    base = Dovetail(target, None, "cpu").generate_baseline(prompt, InferConfig(max_new_tokens=n))
    ref = base.output_ids
    info.update(peak_rss_target_only_mb=round(peak_rss_mb(), 1), rss_after_decoding_mb=round(rss_mb(), 1))
    info.update(rss_split_mb())  # anonymous vs file-backed (the mapped weights) after target-only decoding
    print(f"target-only: {base.tokens_per_s:.2f} tok/s, peak RSS {info['peak_rss_target_only_mb']:.0f} MB", flush=True)

    b, d, k = args.tree
    shapes = {
        f"tree b{b} d{d} k{k}": InferConfig(budget=b, depth=d, top_k=k, min_prob=0.0, max_new_tokens=n),
        f"chain {args.chain}": InferConfig(
            budget=args.chain, depth=args.chain, top_k=1, min_prob=0.0, max_new_tokens=n
        ),
    }
    drafts = {"random draft": lambda: random_draft(target, args.seed)}
    if not args.no_oracle:
        drafts["oracle draft"] = lambda: oracle_draft(target, prompt + ref)
    rows = []
    for dname, make in drafts.items():
        engine = Dovetail(target, make(), "cpu")
        for sname, cfg in shapes.items():
            rows.append(row(f"{dname}, {sname}", engine.generate(prompt, cfg), ref, target, prompt))
            r = rows[-1]
            print(f"{r['row']}: equal {r['equal']}, tau {r['tau']}, {r['tokens_per_s']} tok/s", flush=True)
        del engine
        gc.collect()

    result = {
        "target": name,
        "shape": target.spec.source == "shape",
        "quant": args.quant,
        "dtype": str(target.dtype).removeprefix("torch."),
        **info,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_ok": info["peak_rss_target_only_mb"] <= args.max_rss_gb * 1024,
        "max_rss_gb": args.max_rss_gb,
        "prompt_len": args.prompt_len,
        "new_tokens": n,
        "target_only": {
            "tokens_per_s": round(base.tokens_per_s, 3),
            "ms_per_forward": round(base.decode_s / max(base.forwards, 1) * 1e3, 1),
            "forwards": base.forwards,
            "ids": ref,
        },
        "rows": rows,
        "equal": all(r["equal"] for r in rows),
        **stamp(),
    }
    out = Path(args.out) if args.out else RESULTS / "shape_decode" / f"{name}_{args.quant}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"equal: {result['equal']}, peak RSS {result['peak_rss_mb']:.0f} MB; wrote {out}")
    return 0 if result["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
