"""Recipe levers on evaluated τ at equal training wall-clock, one table.

    python benchmarks/recipe_levers.py --minutes 5 [--levers base unroll2 ...] [--prompts 8]

Each lever is `python train.py experiment=cpu_draft <overrides> trainer.max_time=<minutes>` (the self-distilled
ShareGPT set, the same split and seed; the LR schedule decays by time when a run is time-limited), one run after
another on this machine alone. Then every exported draft decodes, with the real target at the paper's tree (15 draft
tokens, 8 levels, top-k 10, full vocabulary), greedy, bf16: the first question(s) of each of the six bench sets
(the evaluated τ) and the validation split's held-out prompts as the training callback does (val τ). The JSON also
has the rank correlations of val τ and of the training-time proxy sim τ with the evaluated τ. Writes JSON (stamped)
and a Markdown table; a run already finished in `--runs-dir` is reused, so a killed sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, stamp

LEVERS: dict[str, list[str]] = {
    "base": [],  # experiment=cpu_draft as it is: DGF, depth 1, noise U(-0.1, 0.1), lr 1e-3, draft vocab 8192
    "unroll2": ["loss.unroll=2"],
    "unroll3": ["loss.unroll=3"],
    "noise_by_length": ["loss.noise_by_length=true"],
    "lr3e-3": ["optim.lr=3e-3"],
    "lr3e-4": ["optim.lr=3e-4"],
    "linear_decay": ["optim.schedule=linear"],  # linear instead of cosine decay to 0.1 * lr
    "depth1": ["draft.depth=1"],  # = base: a second run of the same settings (the run-to-run spread)
    "depth4": ["draft.depth=4"],
    "depth2": ["draft.depth=2"],
    "depth5": ["draft.depth=5"],
    "concat_depth1": ["draft=eagle"],
    "full_vocab": ["loss.draft_vocab=null"],
    "all_positions": ["loss.positions=all"],  # the loss on prompt tokens too (the target's features are exact there)
    "lr2e-3": ["optim.lr=2e-3"],
    "w_tok0.5": ["loss.w_tok=0.5"],  # more weight on the token loss (the paper: 0.1)
    "w_tok1": ["loss.w_tok=1.0"],
    "vocab4096": ["loss.draft_vocab=4096"],  # the token loss over inference's default draft vocabulary
    "init_target": ["init_layers=target"],  # the decoder layer starts from the target's last layer
    "batch4": ["data.batch_size=4"],  # twice the optimizer steps per minute, half the tokens each
    "batch16": ["data.batch_size=16"],
}


def train(name: str, minutes: float, runs_dir: Path, extra: list[str]) -> Path:
    run = runs_dir / name
    if (run / "draft" / "model.safetensors").exists():
        return run / "draft"
    secs = int(minutes * 60)
    cmd = [
        sys.executable,
        "train.py",
        "experiment=cpu_draft",
        *LEVERS[name],
        *extra,
        "trainer.max_epochs=50",
        f"trainer.max_time=00:{secs // 3600:02d}:{secs % 3600 // 60:02d}:{secs % 60:02d}",
        "callbacks.speculative_validation.num_prompts=0",  # measured after training, on the same prompts for all
        "callbacks.model_checkpoint.monitor=val/sim_tau",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run}",
    ]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return run / "draft"


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation (pandas, as the ablation notebook computes it); None for fewer than 3 pairs."""
    import pandas as pd

    if len(a) < 3:
        return None
    r = pd.Series(a).corr(pd.Series(b), method="spearman")
    return None if pd.isna(r) else round(float(r), 3)


def last_metric(run: Path, key: str) -> float | None:
    import csv

    rows = []
    for path in sorted((run / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            rows += [r for r in csv.DictReader(f) if r.get(key)]
    return float(rows[-1][key]) if rows else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--levers", nargs="*", default=["base", "unroll2", "noise_by_length", "depth1", "concat_depth1"])
    ap.add_argument("--per-bench", type=int, default=1, help="bench questions per set for the evaluated τ")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    ap.add_argument("--runs-dir", default=str(ROOT / "logs" / "levers"))
    ap.add_argument("--out", default=str(RESULTS / "recipe_levers" / "recipe_levers.json"))
    args = ap.parse_args()
    runs_dir = Path(args.runs_dir)
    drafts = {name: train(name, args.minutes, runs_dir, args.extra) for name in args.levers}

    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dovetail_infer.bench import conversation, load_bench
    from dovetail_infer.checkpoint import load_draft, read_meta
    from dovetail_infer.models.target import load_target
    from dovetail_train.callbacks import SpeculativeValidation
    from dovetail_train.data.datamodule import DistillDataModule

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=cpu_draft", f"paths.root_dir={ROOT}"])
    target = load_target(OmegaConf.to_container(cfg.target, resolve=True))
    dm = DistillDataModule(target=target, seed=cfg.seed, **OmegaConf.to_container(cfg.data, resolve=True))
    dm.setup()
    # val/tau exactly as the training callback computes it (its defaults, the validation split's prompts)
    val_meter = SpeculativeValidation()
    val_meter.bind(target, dm.heldout_prompts(4 * val_meter.num_prompts))
    # the evaluated τ: the first questions of the six bench sets (never trained on), paper tree, greedy
    bench = SpeculativeValidation(num_prompts=1000, max_new_tokens=args.max_new_tokens)
    names = ["mt_bench", "humaneval", "gsm8k", "alpaca", "qa", "sum"]
    prompts = [
        target.apply_chat_template(conversation(q, [], 0))
        for n in names
        for q in load_bench(n, ROOT / "data" / "bench", limit=args.per_bench)
    ]
    bench.bind(target, prompts)
    rows = []
    for name, d in drafts.items():
        draft, _ = load_draft(d, target.identity(), dtype=torch.float32)
        summary = read_meta(d)["summary"]
        t = time.perf_counter()
        v, m = val_meter.measure(draft), bench.measure(draft)
        conf = json.loads((d / "config.json").read_text())
        rows.append(
            {
                "lever": name,
                "overrides": LEVERS[name],
                "depth": conf["depth"],
                "fusion": conf["fusion"],
                "train_steps": summary["global_step"],
                "train_seconds": summary["train_seconds"],
                "tau": round(m["val/tau"], 3),
                **{k.replace("val/", ""): round(x, 3) for k, x in m.items() if k != "val/tau"},
                "val_tau": round(v["val/tau"], 3),
                "sim_tau": last_metric(d.parent, "val/sim_tau"),
                "eval_seconds": round(time.perf_counter() - t, 1),
            }
        )
        print(rows[-1], flush=True)
    taus = [r["tau"] for r in rows]
    with_sim = [r for r in rows if r["sim_tau"] is not None]
    result = {
        **stamp(),
        "minutes_per_run": args.minutes,
        "bench_prompts": len(bench.prompts),
        "val_prompts": len(val_meter.prompts),
        "max_new_tokens": args.max_new_tokens,
        "tree": {"budget": 15, "depth": 8, "top_k": 10, "draft_vocab": None},
        "rows": rows,
        "spearman_val_tau_vs_tau": spearman([r["val_tau"] for r in rows], taus),
        "spearman_sim_tau_vs_tau": spearman([r["sim_tau"] for r in with_sim], [r["tau"] for r in with_sim]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Recipe levers, {args.minutes:g} min of training each (measured {result['date']} at {result['commit']}). "
        f"τ: {result['bench_prompts']} bench questions (the first {args.per_bench} of each set, prompts ≤ 768 tokens), "
        f"{args.max_new_tokens} new tokens, "
        "paper tree (15 tokens, 8 levels, top-k 10), greedy, bf16; val τ: the training callback's measure "
        f"({result['val_prompts']} held-out prompts, 64 tokens).",
        "",
        "| lever | depth | fusion | steps | τ | accept ≥1 | ≥2 | ≥3 | val τ | sim τ |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sim = f"{r['sim_tau']:.3f}" if r["sim_tau"] is not None else "–"
        lines.append(
            f"| {r['lever']} | {r['depth']} | {r['fusion']} | {r['train_steps']} | {r['tau']:.3f} | "
            f"{r['accept_d1']:.2f} | {r['accept_d2']:.2f} | {r['accept_d3']:.2f} | {r['val_tau']:.3f} | {sim} |"
        )
    lines += [
        "",
        f"Spearman(val τ, τ) = {result['spearman_val_tau_vs_tau']}; "
        f"Spearman(sim τ, τ) = {result['spearman_sim_tau_vs_tau']}.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
