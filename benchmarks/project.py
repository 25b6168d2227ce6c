"""Projected speculative-decoding speed from measured parts, checked against real decoding, applied to a 7B target.

One decoding step is one target forward. Its time and its tokens:

    step_ms     = draft_ms + T(k) + transfer_ms + overhead_ms
    draft_ms    = levels x draft step time; levels = tree depth (the commit forward of the accepted tokens, then
                  one forward per level below the root, each with the draft's LM head and the tree selection)
    T(k)        = one target forward of k = tree tokens + root at the decoding context (benchmarks/verify_cost.py;
                  linear between measured k)
    transfer_ms = bytes / bandwidth + transfers x latency, bytes as the engine counts them: the k ids and their
                  parents to the target, the accepted tokens' hidden states and ids back to the draft (greedy)
    overhead_ms = host bookkeeping outside T(k): tree and verification masks, greedy acceptance, KV compaction
    tokens/step = τ (accepted draft tokens + the target's own token), from an evaluation summary
    tokens/s    = 1000 τ / step_ms; the target-only baseline is 1000 / T(1)

`validate` measures every input on SmolLM2 with the shipped draft (T(k) at the prompts' mean decoding context, the
draft step of each tree shape, the host overhead; τ from the same runs) and compares the projection with the
measured tokens/s at several shapes (`min_prob` 0, so every tree is full and k is known). `predict` applies the
model to a T(k) table from verify_cost.py with τ from evaluation summaries (or assumed) and an assumed GPU draft
step time, beside the paper's LLaMA-2-Chat-7B figures.

    python benchmarks/project.py validate --out benchmarks/results/project/smollm2_validate.json
    python benchmarks/project.py predict --verify-cost benchmarks/results/verify_cost/llama2_7b_shape_int4.json \\
        --accept benchmarks/results/shipped_draft/evaluate_paper_tree.json --tau 3 4 5 \\
        --out benchmarks/results/project/llama2_7b_int4_predict.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from dovetail_infer.baseline import finish, sync
from dovetail_infer.engine import DraftSide, GenerationResult, InferConfig
from dovetail_infer.kv_cache import KVCache
from dovetail_infer.sampling import greedy_accept
from dovetail_infer.tree import DraftTree

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "results" / "project"
DRAFT = ROOT / "drafts" / "smollm2-135m-dovetail"

# arXiv 2412.18934: LLaMA-2-Chat-7B on HumanEval, target on the CPU, draft on a GPU (their CPU and GPU, not ours)
PAPER = {
    "source": "Dovetail, arXiv 2412.18934 (abstract)",
    "target": "LLaMA-2-Chat-7B",
    "bench": "HumanEval",
    "cpu_only_tokens_per_s": 2.12,
    "tokens_per_s": 5.86,
    "speedup": 2.77,
    "draft_vram_gb": 3,
    "tokens_per_s_7gb_vram": 8.0,
}
PAPER_SHAPE = (15, 8, 10)  # conf/infer/paper.yaml: budget, depth, top_k (the official code's tree)
# validate's shapes: (budget, depth, top_k, draft_vocab); min_prob 0 throughout
SHAPES = ((2, 2, 1, 4096), (4, 4, 1, 4096), (4, 3, 2, 4096), (8, 6, 4, 4096), (15, 8, 10, None))
# predict's assumed GPU draft step times (ms per tree level, LLaMA-2-7B-sized draft): see docs/large_targets.md
DRAFT_STEP_MS = (1.0, 3.0, 10.0)
TRANSFERS_PER_STEP = 3  # ids to the target; hidden states and ids back to the draft


# ---- the model: pure arithmetic -------------------------------------------------------------------------------


def tree_tokens(budget: int, depth: int, top_k: int) -> int:
    """Draft tokens in a full tree (`min_prob` 0): the budget, or every candidate when there are fewer (top_k
    children of the root, then top_k children of each of the top_k best candidates per further level)."""
    if min(budget, depth, top_k) < 1:
        raise ValueError(f"budget, depth and top_k must be >= 1, got {budget}, {depth}, {top_k}")
    return min(budget, top_k + (depth - 1) * top_k * top_k)


def interp_ms(ms_by_k: dict[int, float], k: float) -> float:
    """T(k) from a table of measured k: exact where measured, linear between neighbours, never extrapolated."""
    ks = sorted(ms_by_k)
    if not ks or k < ks[0] or k > ks[-1]:
        raise ValueError(f"k={k} is outside the measured k {ks}: measure it (benchmarks/verify_cost.py --k ...)")
    if k in ms_by_k:
        return float(ms_by_k[k])
    hi = next(x for x in ks if x > k)
    lo = max(x for x in ks if x < k)
    return ms_by_k[lo] + (ms_by_k[hi] - ms_by_k[lo]) * (k - lo) / (hi - lo)


def transfer_bytes_per_step(k: int, tokens_per_step: float, hidden: int, elem_bytes: int) -> float:
    """Bytes one greedy step moves between the devices, as the engine counts them: the k tree ids and their parents
    (int64) to the target, then each new token's hidden state (hidden x elem_bytes) and id (int64) to the draft."""
    return 16 * k + tokens_per_step * (hidden * elem_bytes + 8)


def project(
    tokens_per_step: float,
    verify_ms: float,
    baseline_ms: float,
    draft_ms: float = 0.0,
    transfer_bytes: float = 0.0,
    gbps: float | None = None,
    latency_ms: float = 0.0,
    overhead_ms: float = 0.0,
) -> dict[str, float]:
    """One step's time split, tokens/s and speedup over target-only decoding (one token per `baseline_ms`).
    `gbps` None: the devices are one (no transfer time). `break_even_tau`: the τ at which the speedup is 1."""
    if tokens_per_step < 1:
        raise ValueError(f"tokens per step (τ) must be >= 1, got {tokens_per_step}")
    if verify_ms <= 0 or baseline_ms <= 0:
        raise ValueError(f"T(k) and T(1) must be > 0 ms, got {verify_ms} and {baseline_ms}")
    transfer_ms = (transfer_bytes / (gbps * 1e9) * 1e3 + latency_ms) if gbps else 0.0
    step_ms = draft_ms + verify_ms + transfer_ms + overhead_ms
    tps = 1e3 * tokens_per_step / step_ms
    return {
        "tau": tokens_per_step,
        "draft_ms": draft_ms,
        "verify_ms": verify_ms,
        "transfer_ms": transfer_ms,
        "overhead_ms": overhead_ms,
        "step_ms": step_ms,
        "tokens_per_s": tps,
        "baseline_tokens_per_s": 1e3 / baseline_ms,
        "speedup": tps * baseline_ms / 1e3,
        "break_even_tau": step_ms / baseline_ms,
    }


def tau_for(tokens_per_s: float, step_ms: float) -> float:
    """The τ a step of `step_ms` needs to reach `tokens_per_s`."""
    return tokens_per_s * step_ms / 1e3


# ---- acceptance from evaluation summaries ---------------------------------------------------------------------


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Summary rows of an evaluation: evaluate.py's summary.json (a list), a results file with `rows`
    (benchmarks/results/shipped_draft/, this script's validate output) or a sweep_summary.json."""
    data = json.loads(Path(path).read_text())
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a list of summary rows or an object with `rows`")
    return rows


def acceptance_by_shape(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one tree shape pooled over benches: τ weighted by forwards, the accepted-length histogram summed,
    the fraction of steps accepting a draft token at depth d+1, the expected accepted length."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("budget") == "auto" or not r.get("forwards") or r.get("tau") is None:
            continue
        key = (int(r["budget"]), int(r["depth"]), int(r["top_k"]), r.get("min_prob"), r.get("draft_vocab"))
        groups.setdefault(key, []).append(r)
    out = []
    for (budget, depth, top_k, min_prob, vocab), rs in groups.items():
        fwd = sum(r["forwards"] for r in rs)
        hist = [0] * max(len(r.get("accept_hist") or []) for r in rs)
        for r in rs:
            for a, n in enumerate(r.get("accept_hist") or []):
                hist[a] += n
        steps = sum(hist)
        out.append(
            {
                "budget": budget,
                "depth": depth,
                "top_k": top_k,
                "min_prob": min_prob,
                "draft_vocab": vocab,
                "benches": [r.get("bench") for r in rs],
                "forwards": fwd,
                "tau": sum(r["tau"] * r["forwards"] for r in rs) / fwd,
                "accept_frac_by_depth": [sum(hist[d + 1 :]) / steps for d in range(len(hist) - 1)] if steps else [],
                "expected_accepted": sum(a * n for a, n in enumerate(hist)) / steps if steps else None,
            }
        )
    return out


# ---- measuring the inputs -------------------------------------------------------------------------------------


def _random_cache(cfg: Any, size: int, context: int, dtype: torch.dtype, device: Any, gen: torch.Generator) -> KVCache:
    cache = KVCache.for_model(cfg, size, dtype=dtype, device=device)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=gen))
    cache.length = context
    return cache


@torch.no_grad()
def draft_step_ms(
    side: DraftSide,
    cfg: InferConfig,
    context: int,
    rows: int = 3,
    repeats: int = 7,
    warmup: int = 2,
    between: Callable[[], Any] | None = None,
) -> tuple[float, DraftTree]:
    """Median ms of one step's drafting at `context` committed positions, as the engine drafts: the commit forward
    of `rows` accepted tokens with their features, then `cfg`'s tree (every level's forward, LM head and selection).
    The draft's cache holds random keys and values (the cost does not depend on them). `between` runs, untimed,
    before each call: a target forward there leaves the CPU's caches as decoding does. Returns it and a tree."""
    dev, dtype, gen = side.device, side.embed.dtype, torch.Generator().manual_seed(0)
    saved = side.cache
    side.cache = _random_cache(
        side.model.config.layer_config(), context + rows + cfg.top_k * cfg.depth + 1, context, dtype, dev, gen
    )
    feats = torch.randn(rows, side.embed.shape[1], generator=gen).to(dev, dtype)
    ids = torch.randint(0, side.vocab_size, (rows,), generator=gen).to(dev)
    dgen, times, tree = torch.Generator(dev).manual_seed(0), [], None
    try:
        for i in range(warmup + repeats):
            if between is not None:
                between()
            sync(dev)
            t0 = time.perf_counter()
            pred = side.commit(feats, ids, context)
            tree, _ = side.grow(int(ids[-1]), pred, cfg, dgen)
            sync(dev)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        side.cache = saved
    return statistics.median(times), tree


@torch.no_grad()
def verify_ms(target: Any, ks: Iterable[int], context: int, repeats: int = 5, warmup: int = 2) -> dict[int, float]:
    """T(k) for each k at `context`, measured as benchmarks/verify_cost.py measures it."""
    from verify_cost import time_forward

    ks = sorted(set(ks))
    gen = torch.Generator().manual_seed(0)
    cache = _random_cache(target.config, context + max(ks), context, target.dtype, "cpu", gen)
    return {k: time_forward(target.model, cache, k, context, repeats, warmup, gen) for k in ks}


@torch.no_grad()
def host_ms(target: Any, tree: DraftTree, context: int, accepted: int = 2, repeats: int = 20) -> float:
    """Median ms of a step's host work outside T(k) and the draft: the ids tensor, positions and the verification
    mask, greedy acceptance over the tree's logits, compaction of an accepted path of `accepted` nodes in the
    target's KV cache, the end-of-output check."""
    n1, dtype = len(tree.tokens), target.dtype
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n1, target.config.vocab_size, generator=gen).to(dtype)
    cache = KVCache.for_model(target.config, context + n1, dtype=dtype)
    path = max(tree.paths(), key=len)[: accepted + 1]
    times = []
    for _ in range(repeats):
        cache.length = context
        t0 = time.perf_counter()
        ids = torch.tensor(tree.tokens)
        pos = (context + torch.tensor(tree.depths))[None]
        mask = torch.cat([torch.ones(n1, context, dtype=torch.bool), tree.mask()], 1)
        greedy_accept(tree, logits)
        cache.commit([context + i for i in path], start=context)
        finish([int(ids[i]) for i in path], target.eos_ids, 10**6)
        times.append((time.perf_counter() - t0) * 1e3)
        del pos, mask
    return statistics.median(times)


# ---- validate -------------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, int, int, int | None]:
    """`B,D,K[,V]` -> (budget, depth, top_k, draft_vocab); V `none` or absent: the full vocabulary."""
    parts = text.split(",")
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected BUDGET,DEPTH,TOP_K[,DRAFT_VOCAB|none]")
    vocab = None if len(parts) == 3 or parts[3].lower() in ("none", "null") else int(parts[3])
    return int(parts[0]), int(parts[1]), int(parts[2]), vocab


def shape_name(budget: int, depth: int, top_k: int) -> str:
    return f"b{budget} d{depth} k{top_k}"


def vocab_tag(vocab: int | None) -> str:
    """The draft's vocabulary (its LM head's rows) as validate's shape names show it."""
    return f" v{vocab}" if vocab else " full vocab"


def _record(res: GenerationResult, base: GenerationResult) -> dict[str, Any]:
    rec = dataclasses.asdict(res)
    rec["matches_baseline"] = res.output_ids == base.output_ids
    rec["tokens_per_s"] = rec["tokens_per_s"] if res.forwards else None
    return rec


def decoded_tokens_per_s(results: list[GenerationResult]) -> float:
    """Tokens made by decoding forwards (the first new token is prefill's) per second of decoding."""
    return sum(r.new_tokens - 1 for r in results if r.forwards) / sum(r.decode_s for r in results if r.forwards)


def _mean_inputs(a: dict, b: dict) -> dict:
    return {k: (a[k] + b[k]) / 2 for k in a}


def validate(args: argparse.Namespace) -> dict[str, Any]:
    from common import bench_prompts, stamp, target_for

    from dovetail_infer.engine import Dovetail
    from dovetail_infer.report import summarize

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    target = target_for(args.target, "bfloat16")
    prompts = bench_prompts(target, args.per_bench, Path(args.bench_root))
    n = args.max_new_tokens
    context = round(statistics.mean(len(p) for p in prompts) + n / 2)
    engines = {
        v: Dovetail.from_pretrained(args.draft, target, "cpu", draft_vocab=v) for v in {s[3] for s in args.shape}
    }
    cfgs = {s: InferConfig(budget=s[0], depth=s[1], top_k=s[2], max_new_tokens=n, min_prob=0.0) for s in args.shape}
    ks = {1} | {tree_tokens(*s[:3]) + 1 for s in args.shape}
    print(f"{len(prompts)} prompts, {n} new tokens, mean decoding context {context}, T(k) at k {sorted(ks)}")

    gen = torch.Generator().manual_seed(0)
    tcache = _random_cache(target.config, context + max(ks), context, target.dtype, "cpu", gen)

    def verify_forward(k: int) -> Callable[[], Any]:
        ids = torch.randint(0, target.config.vocab_size, (1, k), generator=gen)
        return lambda: target.model.logits(target.model(ids, cache=tcache, start=context))

    def inputs() -> dict[str, Any]:
        tk = verify_ms(target, ks, context, args.repeats)
        draft, host = {}, {}
        for s, cfg in cfgs.items():  # each draft step after a verification forward of its tree, as in decoding
            flush = verify_forward(tree_tokens(*s[:3]) + 1)
            draft[s], tree = draft_step_ms(engines[s[3]].draft_side, cfg, context, repeats=args.repeats, between=flush)
            host[s] = host_ms(target, tree, context)
        return {"verify_ms": tk, "draft_ms": draft, "host_ms": host}

    base_engine = next(iter(engines.values()))
    for p in prompts[:1]:  # warm-up
        base_engine.generate_baseline(p[:64], InferConfig(max_new_tokens=8))
        for s, cfg in cfgs.items():
            engines[s[3]].generate(p[:64], dataclasses.replace(cfg, max_new_tokens=8))
    before = inputs()
    runs: dict[Any, list[list[GenerationResult]]] = {k: [] for k in ["baseline", *cfgs]}
    for i in range(args.runs):
        for k in runs:
            runs[k].append([])
        for j, p in enumerate(prompts):
            runs["baseline"][i].append(base_engine.generate_baseline(p, InferConfig(max_new_tokens=n)))
            for s, cfg in cfgs.items():
                runs[s][i].append(engines[s[3]].generate(p, cfg))
            print(f"pass {i + 1}/{args.runs}: prompt {j + 1}/{len(prompts)}", end="\r", flush=True)
    print()
    after = inputs()
    used = {key: _mean_inputs(before[key], after[key]) for key in before}
    tk = used["verify_ms"]

    base_last = runs["baseline"][-1]
    base_tps = statistics.median(decoded_tokens_per_s(r) for r in runs["baseline"])
    hidden, elem = target.config.hidden_size, target.dtype.itemsize
    baseline = {
        "measured_tokens_per_s": base_tps,
        "projected_tokens_per_s": 1e3 / tk[1],
        "error": 1e3 / tk[1] / base_tps - 1,
        "measured_ms_per_forward": 1e3 / base_tps,
    }
    shapes, rows = [], []
    for s in cfgs:
        last = runs[s][-1]
        row = summarize([_record(r, b) for r, b in zip(last, base_last)], [_record(b, b) for b in base_last], s[1])
        row.update(bench="validate", budget=s[0], depth=s[1], top_k=s[2], min_prob=0.0, draft_vocab=s[3])
        row.update(max_new_tokens=n, target=args.target, ckpt=str(args.draft), draft_device="cpu", context=context)
        rows.append(row)
        acc = acceptance_by_shape([row])[0]
        k = tree_tokens(*s[:3]) + 1
        proj = project(acc["tau"], tk[k], tk[1], draft_ms=used["draft_ms"][s], overhead_ms=used["host_ms"][s])
        measured = statistics.median(decoded_tokens_per_s(r) for r in runs[s])
        fwd = sum(r.forwards for r in last)
        prefill_bytes = sum(len(p) * (hidden * elem + 8) for p in prompts)
        shapes.append(
            {
                "shape": shape_name(*s[:3]) + vocab_tag(s[3]),
                "budget": s[0],
                "depth": s[1],
                "top_k": s[2],
                "draft_vocab": s[3],
                "k": k,
                "tau": acc["tau"],
                "accept_frac_by_depth": acc["accept_frac_by_depth"],
                "inputs_before": {
                    "verify_ms": before["verify_ms"][k],
                    "draft_ms": before["draft_ms"][s],
                    "host_ms": before["host_ms"][s],
                },
                "inputs_after": {
                    "verify_ms": after["verify_ms"][k],
                    "draft_ms": after["draft_ms"][s],
                    "host_ms": after["host_ms"][s],
                },
                "projected": proj,
                "measured": {
                    "tokens_per_s": measured,
                    "tokens_per_s_by_pass": [decoded_tokens_per_s(r) for r in runs[s]],
                    "speedup": measured / base_tps,
                    "draft_ms_per_forward": sum(r.draft_s for r in last) / fwd * 1e3,
                    "verify_ms_per_forward": sum(r.verify_s for r in last) / fwd * 1e3,
                    "transfer_other_ms_per_forward": sum(r.transfer_s + r.other_s for r in last) / fwd * 1e3,
                    "transfer_bytes_per_forward": (sum(r.transfer_bytes for r in last) - prefill_bytes) / fwd,
                    "greedy_equal": sum(r.output_ids == b.output_ids for r, b in zip(last, base_last)),
                },
                "transfer_bytes_per_step_formula": transfer_bytes_per_step(k, acc["tau"], hidden, elem),
                "error": proj["tokens_per_s"] / measured - 1,
            }
        )
        shapes[-1]["within_10pct"] = abs(shapes[-1]["error"]) <= 0.10
    ok = sum(x["within_10pct"] for x in shapes)
    return {
        "what": "projected (from measured T(k), draft step, host overhead and the run's τ) vs measured tokens/s",
        **stamp(),
        "command": "python benchmarks/project.py " + " ".join(sys.argv[1:]),
        "target": args.target,
        "draft": str(args.draft),
        "prompts": len(prompts),
        "max_new_tokens": n,
        "context": context,
        "runs": args.runs,
        "repeats": args.repeats,
        "verify_ms": {"before": before["verify_ms"], "after": after["verify_ms"], "used": tk},
        "baseline": baseline,
        "shapes": shapes,
        "within_10pct": ok,
        "passed": ok >= 4,
        "seconds": round(time.perf_counter() - t_start, 1),
        "rows": rows,
    }


def validate_md(res: dict[str, Any]) -> str:
    lines = [
        f"{res['target']} + {Path(res['draft']).name}, {res['prompts']} prompts, {res['max_new_tokens']} new tokens, "
        f"mean decoding context {res['context']}, {res['threads']} threads, {res['runs']} pass(es); {res['date']}, "
        f"`{res['commit']}`",
        "",
        "| shape | k | τ | T(k) ms | draft ms | host ms | projected tok/s | measured tok/s | error | "
        "measured ms draft / verify / rest |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    b = res["baseline"]
    lines.append(
        f"| target only | 1 | 1.00 | {res['verify_ms']['used'][1]:.1f} | – | – | {b['projected_tokens_per_s']:.1f} "
        f"| {b['measured_tokens_per_s']:.1f} | {b['error']:+.1%} | – |"
    )
    for s in res["shapes"]:
        p, m = s["projected"], s["measured"]
        lines.append(
            f"| {s['shape']} | {s['k']} | {s['tau']:.2f} | {p['verify_ms']:.1f} | {p['draft_ms']:.1f} | "
            f"{p['overhead_ms']:.2f} | {p['tokens_per_s']:.1f} | {m['tokens_per_s']:.1f} | {s['error']:+.1%} | "
            f"{m['draft_ms_per_forward']:.1f} / {m['verify_ms_per_forward']:.1f} / "
            f"{m['transfer_other_ms_per_forward']:.2f} |"
        )
    lines += ["", f"within 10%: {res['within_10pct']} of {len(res['shapes'])} shapes ({res['seconds']} s)"]
    return "\n".join(lines) + "\n"


# ---- predict --------------------------------------------------------------------------------------------------


def hidden_size_of(target: str) -> int | None:
    """hidden_size of a conf/target/<name>.yaml with a `random_config` (the shapes), else None."""
    import yaml

    path = ROOT / "conf" / "target" / f"{target}.yaml"
    if not path.exists():
        return None
    return (yaml.safe_load(path.read_text()).get("random_config") or {}).get("hidden_size")


def predict(args: argparse.Namespace) -> dict[str, Any]:
    from common import stamp

    vc = json.loads(Path(args.verify_cost).read_text())
    ms = {int(k): float(v) for k, v in vc["ms"].items()}
    if 1 not in ms:
        raise SystemExit(f"{args.verify_cost}: no T(1), the target-only baseline")
    hidden = args.hidden_size or hidden_size_of(vc["target"])
    if not hidden:
        raise SystemExit(f"--hidden-size is needed: conf/target/{vc['target']}.yaml gives none")
    elem = 2 if vc.get("dtype") in ("bfloat16", "float16") else 4
    sources = []
    for path in args.accept:
        for acc in acceptance_by_shape(load_rows(path)):
            sources.append({**acc, "source": str(path)})
    for b, d, k in args.shape:
        for tau in args.tau:
            sources.append({"budget": b, "depth": d, "top_k": k, "min_prob": 0.0, "tau": tau, "source": "assumed τ"})
    rows, skipped = [], []
    for acc in sources:
        k = tree_tokens(acc["budget"], acc["depth"], acc["top_k"]) + 1
        name = shape_name(acc["budget"], acc["depth"], acc["top_k"])
        if k > max(ms):
            skipped.append(f"{name} ({acc['source']}): k={k} > the largest measured k {max(ms)}")
            continue
        if acc["tau"] > acc["depth"] + 1:
            skipped.append(f"{name} ({acc['source']}): τ {acc['tau']:g} > depth + 1, more than a step can make")
            continue
        nbytes = transfer_bytes_per_step(k, acc["tau"], hidden, elem)
        for step in args.draft_step_ms:
            p = project(
                acc["tau"],
                interp_ms(ms, k),
                ms[1],
                draft_ms=acc["depth"] * step,
                transfer_bytes=nbytes,
                gbps=args.pcie_gbps,
                latency_ms=TRANSFERS_PER_STEP * args.transfer_latency_us / 1e3,
                overhead_ms=args.overhead_ms,
            )
            rows.append(
                {
                    "shape": name,
                    **{key: acc.get(key) for key in ("budget", "depth", "top_k", "min_prob", "draft_vocab", "source")},
                    "k": k,
                    "verify_interpolated": k not in ms,
                    "draft_step_ms": step,
                    "transfer_bytes": nbytes,
                    **p,
                    "tau_for_paper_tokens_per_s": tau_for(PAPER["tokens_per_s"], p["step_ms"]),
                    "tau_for_paper_speedup": PAPER["speedup"] * p["break_even_tau"],
                    # a tree cut short by min_prob verifies fewer tokens: then k (and T(k)) is an upper bound
                    "k_is_upper_bound": bool(acc.get("min_prob")),
                }
            )
    return {
        "what": "projected tokens/s of speculative decoding with a GPU draft and this CPU's measured T(k)",
        **stamp(),
        "command": "python benchmarks/project.py " + " ".join(sys.argv[1:]),
        "verify_cost": str(args.verify_cost),
        "target": vc["target"],
        "quant": vc.get("quant"),
        "context": vc.get("context"),
        "verify_cost_stamp": {k: vc.get(k) for k in ("commit", "date", "cpu", "threads")},
        "hidden_size": hidden,
        "assumed": {
            "draft_step_ms": list(args.draft_step_ms),
            "pcie_gbps": args.pcie_gbps,
            "transfer_latency_us": args.transfer_latency_us,
            "transfers_per_step": TRANSFERS_PER_STEP,
            "overhead_ms": args.overhead_ms,
        },
        "paper": PAPER,
        "rows": rows,
        "skipped": skipped,
    }


def predict_md(res: dict[str, Any]) -> str:
    paper = res["paper"]
    lines = [
        f"{res['target']} {res['quant']} (T(k) at context {res['context']}: {res['verify_cost']}); draft on a GPU, "
        f"{res['assumed']['pcie_gbps']} GB/s; {res['date']}, `{res['commit']}`",
        "",
        f"Paper ({paper['target']}, {paper['bench']}): CPU-only {paper['cpu_only_tokens_per_s']} tok/s, Dovetail "
        f"{paper['tokens_per_s']} tok/s ({paper['speedup']}x) with a {paper['draft_vram_gb']} GB-VRAM draft, on "
        "their hardware.",
        "",
        "| shape | τ (source) | k | draft step ms | step ms: draft + T(k) + transfer + host | tok/s | × CPU-only here "
        "| break-even τ | τ for 5.86 tok/s | τ for 2.77× |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        src = Path(r["source"]).name if r["source"] != "assumed τ" else "assumed"
        k = f"{r['k']}{'*' if r['verify_interpolated'] else ''}{'≤' if r['k_is_upper_bound'] else ''}"
        lines.append(
            f"| {r['shape']} | {r['tau']:.2f} ({src}) | {k} | {r['draft_step_ms']:g} | {r['step_ms']:.0f} = "
            f"{r['draft_ms']:.0f} + {r['verify_ms']:.0f} + {r['transfer_ms']:.2f} + {r['overhead_ms']:.1f} | "
            f"{r['tokens_per_s']:.2f} | {r['speedup']:.2f} | {r['break_even_tau']:.2f} | "
            f"{r['tau_for_paper_tokens_per_s']:.2f} | {r['tau_for_paper_speedup']:.2f} |"
        )
    base = res["rows"][0]["baseline_tokens_per_s"] if res["rows"] else float("nan")
    lines += [
        "",
        f"CPU-only here: {base:.2f} tok/s (1000 / T(1)). `*` T(k) interpolated; `≤` the source's min_prob cuts "
        "trees short, so k is an upper bound.",
        *(f"skipped: {s}" for s in res["skipped"]),
    ]
    return "\n".join(lines) + "\n"


# ---- command line ---------------------------------------------------------------------------------------------


def write(out: Path, res: dict[str, Any], md: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out.with_suffix('.json')} and .md")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="measure every input on SmolLM2 and compare with real decoding")
    v.add_argument("--target", default="smollm2_135m")
    v.add_argument("--draft", default=str(DRAFT))
    v.add_argument("--bench-root", default=str(ROOT / "data" / "bench"))
    v.add_argument("--per-bench", type=int, default=2, help="prompts per bench set (6 sets)")
    v.add_argument("--max-new-tokens", type=int, default=64)
    v.add_argument("--shape", type=parse_shape, nargs="+", default=list(SHAPES), help="B,D,K[,DRAFT_VOCAB|none]")
    v.add_argument("--runs", type=int, default=1, help="passes over the prompts (median tokens/s)")
    v.add_argument("--repeats", type=int, default=7, help="timed calls per measured input (median)")
    v.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    v.add_argument("--out", default=str(OUT_DIR / "smollm2_validate.json"))
    p = sub.add_parser("predict", help="tokens/s from a verify_cost T(k) table, τ and an assumed draft step time")
    p.add_argument("--verify-cost", required=True, help="a benchmarks/results/verify_cost/*.json")
    p.add_argument("--accept", nargs="*", default=[], help="evaluation summaries (τ per tree shape)")
    p.add_argument("--tau", type=float, nargs="*", default=[], help="assumed τ values, at each --shape")
    p.add_argument(
        "--shape", type=int, nargs=3, action="append", metavar=("B", "D", "K"), help="for --tau (default: the paper's)"
    )
    p.add_argument("--draft-step-ms", type=float, nargs="+", default=list(DRAFT_STEP_MS), help="GPU ms per level")
    p.add_argument("--pcie-gbps", type=float, default=16.0, help="host-device bandwidth, GB/s")
    p.add_argument("--transfer-latency-us", type=float, default=20.0, help="per transfer (3 a step)")
    p.add_argument("--overhead-ms", type=float, default=1.0, help="host bookkeeping per step")
    p.add_argument("--hidden-size", type=int, default=None, help="default: the target's conf/target yaml")
    p.add_argument("--out", default=None, help="default: benchmarks/results/project/<target>_<quant>_predict.json")
    args = ap.parse_args(argv)
    if args.cmd == "validate":
        res = validate(args)
        write(Path(args.out), res, validate_md(res))
    else:
        args.shape = [tuple(s) for s in args.shape] if args.shape else [PAPER_SHAPE]
        if not args.accept and not args.tau:
            ap.error("predict needs --accept summaries and/or --tau values")
        res = predict(args)
        out = Path(args.out) if args.out else OUT_DIR / f"{res['target']}_{res['quant']}_predict.json"
        write(out, res, predict_md(res))
    return res


if __name__ == "__main__":
    main()
