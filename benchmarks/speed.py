"""Decoding speed, side by side in one run: HF generate (fp32, bf16), HF prompt lookup, llama.cpp,
our target-only decoding, an EAGLE-1 draft and the Dovetail draft at several budgets and `auto`.

    python benchmarks/speed.py --dovetail DRAFT_DIR [--eagle DRAFT_DIR] [--per-bench 1] [--runs 3] [--lookup 3]

`--lookup N` adds rows with prompt lookup before the draft (`infer.lookup=N`), with and without a draft;
`--graft` adds the Dovetail tree rows + lookup with the looked-up chain grafted onto the draft's tree
(`infer.lookup_graft=true`).

Prompts: the first questions of the six bench sets (data/bench), greedy, decoding only
(prefill timed separately and excluded). Each configuration's tokens/s is the mean over prompts; the
reported number is the median of `--runs` passes; within a pass the configurations take turns prompt by
prompt so machine noise hits all of them alike. Greedy outputs are compared with our own target-only
decoding of the same target, dtype and compile mode. Our rows also report τ and where a target forward's
time goes (draft / verify / rest). Writes --out .json and .md after every pass (a killed run keeps
the passes it finished).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from common import (
    RESULTS,
    ROOT,
    Run,
    Runner,
    bench_prompts,
    engine_runner,
    hf_runner,
    llamacpp_runner,
    run_interleaved,
    stamp,
    target_for,
)

from dovetail_infer.autotune import autotune
from dovetail_infer.engine import Dovetail, InferConfig
from dovetail_infer.models.target import Target, locate_gguf


def step_split(runs: list[Run]) -> dict[str, Any]:
    """τ and where a target forward's time goes (ms per forward: draft, verify, the rest), over our engine's runs."""
    rs = [r.result for r in runs if r.result is not None]
    fwd = sum(r.forwards for r in rs)
    if not fwd:
        return {}
    ms = {k: round(sum(getattr(r, f"{k}_s") for r in rs) / fwd * 1e3, 2) for k in ("draft", "verify")}
    rest = sum(r.decode_s - r.draft_s - r.verify_s for r in rs) / fwd * 1e3
    return {
        "tau": round(sum(r.new_tokens - 1 for r in rs) / fwd, 3),
        **{f"{k}_ms_per_forward": v for k, v in ms.items()},
        "rest_ms_per_forward": round(rest, 2),
        "lookup_share": round(sum(r.lookup_forwards for r in rs) / fwd, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dovetail", required=True, help="exported Dovetail draft dir")
    ap.add_argument("--eagle", help="exported EAGLE-1 (concat, depth 1) draft dir")
    ap.add_argument("--target", default="smollm2_135m")
    ap.add_argument("--bench-root", default=str(ROOT / "data" / "bench"))
    ap.add_argument("--per-bench", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--budgets", type=int, nargs="*", default=[2], help="eager chain rows (plus the b8 d6 k4 tree)")
    ap.add_argument("--draft-vocab", type=int, default=4096)
    ap.add_argument("--min-prob", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--skip-hf-fp32", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd rows")
    ap.add_argument("--quant", nargs="*", default=["int4"], help="weight-only quantized targets (compiled rows)")
    ap.add_argument("--max-autotune", action="store_true", help="also bf16 rows with infer.compile=max-autotune")
    ap.add_argument("--draft-quant", nargs="*", default=[], help="also the Dovetail draft weight-only quantized")
    ap.add_argument(
        "--lookup", type=int, nargs="*", default=[], help="also rows with infer.lookup=N (target-only and Dovetail)"
    )
    ap.add_argument(
        "--graft",
        action="store_true",
        help="also the Dovetail tree rows (top_k > 1) + lookup with the chain grafted onto the draft's tree (a chain "
        "draft gives way to the looked-up chain whole: the same τ, only the draft's cost)",
    )
    ap.add_argument("--out", default=str(RESULTS / "speed" / "speed"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.max_new_tokens
    bf16 = target_for(args.target, "bfloat16")
    prompts = bench_prompts(bf16, args.per_bench, Path(args.bench_root))
    ours = Dovetail(bf16, None, "cpu")
    base_cfg = InferConfig(max_new_tokens=n, depth=6, top_k=4)
    runners: dict[str, Runner] = {"ours target-only bf16": engine_runner(ours, base_cfg, baseline=True)}
    runners["HF generate bf16"] = hf_runner(bf16, n)
    runners["HF prompt lookup bf16"] = hf_runner(bf16, n, prompt_lookup_num_tokens=10)
    if not args.skip_hf_fp32:
        runners["HF generate fp32"] = hf_runner(target_for(args.target, "float32"), n)
    notes = {}
    try:
        lc = llamacpp_runner(locate_gguf(bf16.spec), n, args.threads)
    except FileNotFoundError:
        lc = None
    if lc is None:
        notes["llama.cpp"] = "skipped: llama-cpp-python is not installed (pip install -e .[llamacpp])"
    else:
        runners["llama.cpp Q4_1"] = lc
    # row name -> (draft dir, draft_quant)
    drafts = {"dovetail": (args.dovetail, None), **({"eagle": (args.eagle, None)} if args.eagle else {})}
    drafts.update({f"dovetail[{q} draft]": (args.dovetail, q) for q in args.draft_quant})

    def engines_on(target: Target, mode: str | bool = False) -> dict[str, Dovetail]:
        return {
            k: Dovetail.from_pretrained(d, target, "cpu", draft_vocab=args.draft_vocab, compile=mode, draft_quant=q)
            for k, (d, q) in drafts.items()
        }

    engines = engines_on(bf16)
    for name, eng in engines.items():
        shapes = [(b, b, 1) for b in args.budgets] + [(8, 6, 4)]
        for b, d, k in shapes:
            cfg = InferConfig(budget=b, depth=d, top_k=k, max_new_tokens=n, min_prob=args.min_prob)
            runners[f"{name} b{b} d{d} k{k}"] = engine_runner(eng, cfg)

    def tuned(eng: Dovetail, row: str, key: str) -> list[tuple[str, Runner]]:
        """`budget=auto` rows: chosen by autotune on two prompts, without and with each lookup; the choice and the
        profile behind it go to the notes."""
        out = []
        for lk in [0, *args.lookup]:
            a, prof = autotune(eng, prompts[:2], InferConfig(max_new_tokens=n, min_prob=args.min_prob, lookup=lk))
            look = f" + lookup{lk}" if lk else ""
            notes[f"{key}{look} choice"] = f"budget {a.budget} depth {a.depth} top_k {a.top_k}"
            notes[f"{key}{look} profile"] = prof
            out.append((f"{row}{look}", engine_runner(eng, a)))
        return out

    runners.update(tuned(engines["dovetail"], "dovetail auto", "auto"))
    for lk in args.lookup:  # prompt lookup: with no draft (prompt-lookup decoding) and before the draft's chains
        runners[f"ours target-only + lookup{lk}"] = engine_runner(ours, InferConfig(max_new_tokens=n, lookup=lk))
        for b in args.budgets:
            cfg = InferConfig(budget=b, depth=b, top_k=1, max_new_tokens=n, min_prob=args.min_prob, lookup=lk)
            runners[f"dovetail b{b} d{b} k1 + lookup{lk}"] = engine_runner(engines["dovetail"], cfg)

    refs = {name: "ours target-only bf16" for name in runners}  # row -> the target-only row it must equal

    def add_compiled(target: Target, quant: str | None, shapes, mode: str = "default", auto: bool = True) -> None:
        """Compiled rows on `target`: target-only, each draft at each (budget, depth, top_k), and `auto`. A
        quantized target is a different model: its rows carry its name and are compared with its own
        target-only decoding; so are the rows of each compile mode."""
        tag = f" {quant}" if quant else ""
        suffix = " compiled" + ("" if mode == "default" else f" {mode}")
        eng = engines_on(target, mode)
        ref = f"ours target-only {quant or 'bf16'}{suffix}"

        def add(row: str, run: Runner) -> None:
            runners[row], refs[row] = run, ref

        add(ref, engine_runner(eng["dovetail"], base_cfg, baseline=True))
        plain = Dovetail(target, None, "cpu", compile=mode)  # shares the compiled target graphs
        for lk in args.lookup:
            add(
                f"ours target-only {quant or 'bf16'} + lookup{lk}{suffix}",
                engine_runner(plain, replace(base_cfg, lookup=lk)),
            )
        for budget, depth, top_k in shapes:
            cfg = InferConfig(budget=budget, depth=depth, top_k=top_k, max_new_tokens=n, min_prob=args.min_prob)
            for name, e in eng.items():
                add(f"{name}{tag} b{budget} d{depth} k{top_k}{suffix}", engine_runner(e, cfg))
                for lk in args.lookup if name.startswith("dovetail") else ():
                    row = f"{name}{tag} b{budget} d{depth} k{top_k} + lookup{lk}"
                    add(row + suffix, engine_runner(e, replace(cfg, lookup=lk)))
                    if args.graft and top_k > 1:
                        add(f"{row} graft{suffix}", engine_runner(e, replace(cfg, lookup=lk, lookup_graft=True)))
        if auto:
            for row, run in tuned(eng["dovetail"], f"dovetail{tag} auto", f"{quant or 'bf16'}{suffix} auto"):
                add(row + suffix, run)

    compile_s = None
    if not args.no_compile:  # the same configurations with the target step under torch.compile (static shapes)
        t0 = time.perf_counter()
        quantized = {q: target_for(args.target, "bfloat16", quant=q) for q in args.quant}
        add_compiled(bf16, None, [(8, 6, 4)])
        for quant, q in quantized.items():  # weight-only quantized targets verify short drafts only: a 2-token chain
            add_compiled(q, quant, [(2, 2, 1)])
        if args.max_autotune:  # tuned products: no `auto` (it would compile buckets up to 17 at ~80 s each)
            add_compiled(bf16, None, [(3, 3, 1), (4, 3, 2)], "max-autotune", auto=False)
            for quant, q in quantized.items():
                add_compiled(q, quant, [(1, 1, 1), (2, 2, 1)], "max-autotune", auto=False)
        compile_s = time.perf_counter() - t0
    for run in runners.values():  # warm-up
        run(prompts[0][:64] if len(prompts[0]) > 64 else prompts[0])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        **stamp(),
        "target": args.target,
        "prompts": len(prompts),
        "max_new_tokens": n,
        "threads": args.threads,
        "runs": args.runs,
        "draft_vocab": args.draft_vocab,
        "min_prob": args.min_prob,
        "compile_and_autotune_s": None if compile_s is None else round(compile_s, 1),
        "quant": args.quant,
        "draft_quant": args.draft_quant,
        "lookup": args.lookup,
        "graft": args.graft,
        "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]),
        "notes": notes,
    }

    def write(done: int, passes: dict[str, list[float]], last: dict[str, list[Run]]) -> None:
        """Results so far, after every pass: a crash or a kill keeps the passes already run."""
        rows = table_rows(runners, refs, passes, last)
        write_results(out, {**meta, "passes_done": done, "rows": rows}, len(prompts))

    run_interleaved(runners, prompts, args.runs, write)
    print(out.with_suffix(".md").read_text())


def table_rows(
    runners: dict[str, Runner], refs: dict[str, str], passes: dict[str, list[float]], last: dict[str, list[Run]]
) -> list[dict[str, Any]]:
    """One row per configuration: median tokens/s, ratios, greedy equality with its reference, τ and time split."""
    tps = {name: statistics.median(passes[name]) for name in runners if passes.get(name)}
    base = tps.get("ours target-only bf16")
    lcpp = next((v for k, v in tps.items() if k.startswith("llama.cpp")), None)
    rows = []
    for name in tps:
        outs, ref = [r.ids for r in last[name]], [r.ids for r in last[refs[name]]]
        same = None if "fp32" in name or "llama.cpp" in name else sum(a == b for a, b in zip(outs, ref, strict=True))
        own = tps.get(refs[name]) if last[name][0].result is not None else None  # our engine's rows only
        rows.append(
            {
                "config": name,
                "tokens_per_s": round(tps[name], 2),
                "runs": [round(x, 2) for x in passes[name]],
                "greedy_equal": same,
                "vs_its_target_only": round(tps[name] / own, 3) if own else None,
                "vs_ours_target_only": round(tps[name] / base, 3) if base else None,
                "vs_llama_cpp": round(tps[name] / lcpp, 3) if lcpp else None,
                **step_split(last[name]),
            }
        )
    return rows


def write_results(out: Path, result: dict[str, Any], n_prompts: int) -> None:
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"{result['target']}, {n_prompts} prompts, {result['max_new_tokens']} new tokens, {result['threads']} threads, "
        f"median of {result['passes_done']} of {result['runs']} passes (rows take turns prompt by prompt)",
        "",
        "`× its target-only`: against the target-only row of the same target, dtype and compile mode (the row its "
        "greedy output is compared with); ms per target forward: draft / verify / rest.",
        "",
        "| config | tokens/s | × its target-only | × ours eager bf16 | × llama.cpp | τ | ms draft / verify / rest "
        "| greedy = its target-only |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]

    def num(v: float | None, fmt: str = ".2f") -> str:
        return "–" if v is None else format(v, fmt)

    for r in result["rows"]:
        eq = "–" if r["greedy_equal"] is None else f"{r['greedy_equal']}/{n_prompts}"
        split = (
            f"{r['draft_ms_per_forward']:.1f} / {r['verify_ms_per_forward']:.1f} / {r['rest_ms_per_forward']:.1f}"
            if "tau" in r
            else "–"
        )
        lines.append(
            f"| {r['config']} | {r['tokens_per_s']:.1f} | {num(r['vs_its_target_only'])} | "
            f"{num(r['vs_ours_target_only'])} | {num(r['vs_llama_cpp'])} | {num(r.get('tau'))} | {split} | {eq} |"
        )
    notes = "".join(f"\n{k}: {v}" for k, v in result["notes"].items())
    out.with_suffix(".md").write_text("\n".join(lines) + "\n" + notes + "\n")


if __name__ == "__main__":
    main()
