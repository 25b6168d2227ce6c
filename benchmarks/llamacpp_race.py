"""Our fastest CPU decoding against llama.cpp on the same GGUF and the same cores, side by side in one run.

Rows: our target-only decoding and prompt lookup (`infer.lookup`) on each quantized target under
`infer.compile=max-autotune` (int4: bf16 activations, PyTorch's weight-only kernel inside inductor's GEMM
template; int4a8: int8 activations on our VNNI kernel, llama.cpp's own arithmetic), and llama.cpp
(llama-cpp-python, the shipped Q4_1 GGUF). Rows take turns prompt by prompt; tokens/s is the median of
`--runs` passes (each the mean over the prompts); greedy equality is against each target's own target-only
decoding.

    python benchmarks/llamacpp_race.py --per-bench 2 --max-new-tokens 64 --runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, bench_prompts, engine_runner, llamacpp_runner, run_interleaved, stamp, target_for

from dovetail_infer.engine import Dovetail, InferConfig
from dovetail_infer.models.target import locate_gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2_135m")
    ap.add_argument("--bench-root", default=str(ROOT / "data" / "bench"))
    ap.add_argument("--per-bench", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quant", nargs="*", default=["int4", "int4a8"])
    ap.add_argument("--lookup", type=int, default=3)
    ap.add_argument("--mode", default="max-autotune", help="infer.compile mode of our rows")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(RESULTS / "llamacpp_race" / "llamacpp_race"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.max_new_tokens
    runners, refs, compile_s = {}, {}, {}
    prompts = None
    for quant in args.quant:
        target = target_for(args.target, "bfloat16", quant=quant)
        prompts = prompts or bench_prompts(target, args.per_bench, Path(args.bench_root))
        eng = Dovetail(target, None, "cpu", compile=args.mode)
        ref, look = f"ours {quant} target-only", f"ours {quant} + lookup{args.lookup}"
        runners[ref] = engine_runner(eng, InferConfig(max_new_tokens=n), baseline=True)
        runners[look] = engine_runner(eng, InferConfig(max_new_tokens=n, lookup=args.lookup))
        refs[ref] = refs[look] = ref
        t0 = time.perf_counter()
        for name in (ref, look):
            runners[name](prompts[0])  # compiles the buckets this row uses
        compile_s[quant] = round(time.perf_counter() - t0, 1)
    lc = llamacpp_runner(locate_gguf(target.spec), n, args.threads)
    if lc is not None:
        runners["llama.cpp Q4_1"] = lc
        lc(prompts[0])
    passes, last = run_interleaved(runners, prompts, args.runs)
    outputs = {name: [r.ids for r in runs] for name, runs in last.items()}
    tps = {k: statistics.median(v) for k, v in passes.items()}
    lcpp = tps.get("llama.cpp Q4_1")
    rows = []
    for name in runners:
        same = sum(a == b for a, b in zip(outputs[name], outputs[refs[name]])) if name in refs else None
        rows.append(
            {
                "config": name,
                "tokens_per_s": round(tps[name], 2),
                "runs": [round(x, 2) for x in passes[name]],
                "vs_llama_cpp": round(tps[name] / lcpp, 3) if lcpp else None,
                "greedy_equal": same,
            }
        )
    result = {
        **stamp(),
        "target": args.target,
        "prompts": len(prompts),
        "max_new_tokens": n,
        "threads": args.threads,
        "mode": args.mode,
        "compile_s": compile_s,
        "llama_cpp": "measured" if lcpp else "skipped: pip install -e .[llamacpp]",
        "command": "python benchmarks/llamacpp_race.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"{args.target}, {len(prompts)} prompts, {n} new tokens, {args.threads} threads, infer.compile={args.mode}, "
        f"median of {args.runs} interleaved runs",
        "",
        "| config | tokens/s | × llama.cpp | greedy equal |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        vs = "–" if r["vs_llama_cpp"] is None else f"{r['vs_llama_cpp']:.2f}"
        eq = "–" if r["greedy_equal"] is None else f"{r['greedy_equal']}/{len(prompts)}"
        lines.append(f"| {r['config']} | {r['tokens_per_s']:.1f} | {vs} | {eq} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
