"""Evaluate an exported draft: benchmarks x draft-token budgets -> answers JSONL, summary JSON/Markdown, plots.

Pure Python (no Hydra, Lightning or dovetail_train): `evaluate(cfg)` takes a plain dict shaped like
conf/evaluate.yaml. For each bench the target-only baseline runs once; its answers fix every prompt
(a multi-turn question's later turns are asked after the baseline's own earlier answers), and each
budget's speculative run decodes exactly those prompt ids, so the two are compared on the same inputs.
Prompts that do not fit the context (prompt + max_new_tokens + budget + 1) are skipped with a warning
and counted (`n_skipped`), together with the later turns of their conversation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dovetail_infer.autotune import CANDIDATES, autotune
from dovetail_infer.bench import bench_names, conversation, load_bench
from dovetail_infer.checkpoint import CONFIG, read_meta
from dovetail_infer.compiled import compile_mode
from dovetail_infer.engine import DRAFT_VOCAB, Dovetail, InferConfig, check_draft_quant
from dovetail_infer.models.draft import DraftConfig
from dovetail_infer.models.target import Target, load_target
from dovetail_infer.outdir import check_output_dir
from dovetail_infer.report import (
    run_summary,
    summarize,
    sweep_table,
    text_table,
    varying_config,
    write_report,
    write_sweep_report,
)

log = logging.getLogger(__name__)

# the InferConfig settings each summary row repeats
ROW_INFER_KEYS = ("depth", "top_k", "min_prob", "lookup", "lookup_graft", "temperature", "top_p", "max_new_tokens")
TIME_KEYS = ("prefill_s", "decode_s", "draft_s", "verify_s", "transfer_s", "other_s")
# evaluate's own settings beside InferConfig's: the budgets to sweep, how the engine is built, how runs are timed
EVAL_DEFAULTS: dict[str, Any] = {
    "budgets": [4, 8, 16],  # every budget is evaluated; null = [budget]
    "draft_vocab": DRAFT_VOCAB,
    "target_device": None,  # None = the target spec's device
    "draft_device": "auto",
    "max_len": None,
    "warmup": 1,
    "progress": True,
    "compile": False,
    "draft_quant": None,
}
# the `infer` settings of evaluate (and of chat / serve): InferConfig's defaults (the seed is the run's top-level
# `seed`) and evaluate's own; conf/infer/default.yaml restates them for Hydra (tests/test_defaults.py)
INFER_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in dataclasses.asdict(InferConfig()).items() if k != "seed"},
    **EVAL_DEFAULTS,
}


def _missing(value: Any) -> bool:
    return value in (None, "", "???")


def resolve_device(name: str | None) -> str:
    """`auto` -> cuda when available, else cpu."""
    if _missing(name) or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(name)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20


def _numeric(budget: int | str) -> int:
    """The largest budget a setting may use (`auto` chooses among autotune's candidates)."""
    return max(c[0] for c in CANDIDATES) if budget == "auto" else int(budget)


def to_infer_config(
    infer: dict[str, Any], budget: int | str | None = None, seed: int = 0, **overrides: Any
) -> InferConfig:
    """The InferConfig of an `infer` settings dict (a conf/infer group): its InferConfig keys (missing ones take
    InferConfig's defaults), `budget` (an int or `auto`; by default `infer['budget']`), `seed` and `overrides`.
    Other keys (evaluate's own) are ignored; bad values raise ValueError."""
    names = {f.name for f in dataclasses.fields(InferConfig)}
    values = {k: v for k, v in infer.items() if k in names}
    budget = values.get("budget", InferConfig.budget) if budget is None else budget
    return InferConfig(**{**values, "budget": _numeric(budget), "seed": seed, **overrides})


def _record(prompt: dict[str, Any], res: Any, tokenizer: Any) -> dict[str, Any]:
    out_ids = [int(t) for t in res.output_ids]
    decode_s = getattr(res, "decode_s", None)
    tps = getattr(res, "tokens_per_s", None)
    if tps is None and decode_s:
        tps = res.new_tokens / decode_s
    if not res.forwards:  # EOS straight after prefill: no decoding step, so no meaningful tokens/s
        tps = None
    rec = {k: prompt[k] for k in ("question_id", "category", "turn", "prompt_ids")}
    rec.update(
        output_ids=out_ids,
        text=tokenizer.decode(out_ids, skip_special_tokens=True).strip() if tokenizer is not None else "",
        new_tokens=int(res.new_tokens),
        forwards=int(res.forwards),
        tau=float(res.tau),
        tokens_per_s=tps,
        accept_lengths=[int(a) for a in (getattr(res, "accept_lengths", None) or [])],
        transfer_bytes=getattr(res, "transfer_bytes", None),
        lookup_forwards=int(getattr(res, "lookup_forwards", 0)),
        lookup_accepted=int(getattr(res, "lookup_accepted", 0)),
    )
    rec.update({k: getattr(res, k, None) for k in TIME_KEYS})
    return rec


def _prompts(target: Target, questions: list, name: str, limit_len: int) -> tuple[list[dict], int]:
    """Turn-0 prompts of every question (later turns are added once the baseline has answered)."""
    prompts, skipped = [], 0
    for q in questions:
        ids = target.apply_chat_template(conversation(q, [], 0))
        if len(ids) > limit_len:
            log.warning(
                "%s question %s: prompt of %d tokens exceeds %d; skipped", name, q.question_id, len(ids), limit_len
            )
            skipped += len(q.turns)
            continue
        prompts.append(
            {"question": q, "question_id": q.question_id, "category": q.category, "turn": 0, "prompt_ids": ids}
        )
    return prompts, skipped


def _run_baseline(engine, target, prompts, infer, seed, limit_len, bar, path) -> tuple[list[dict], int]:
    """Baseline over all prompts; appends later turns built from its own answers. Returns records, skipped."""
    records, skipped, queue = [], 0, list(prompts)
    cfg = to_infer_config(infer, infer["budget"], seed)
    with open(path, "w", encoding="utf-8") as f:
        while queue:
            p = queue.pop(0)
            rec = _record(p, engine.generate_baseline(p["prompt_ids"], cfg), target.tokenizer)
            records.append(rec)
            p["answers"] = [*p.get("answers", []), rec["text"]]
            f.write(json.dumps(rec) + "\n")
            bar.update(1)
            q, turn = p["question"], p["turn"] + 1
            if turn < len(q.turns):
                ids = target.apply_chat_template(conversation(q, p["answers"], turn))
                if len(ids) > limit_len:
                    log.warning(
                        "question %s turn %d: %d tokens exceed %d; skipped", q.question_id, turn, len(ids), limit_len
                    )
                    skipped += len(q.turns) - turn
                    continue
                nxt = {**p, "turn": turn, "prompt_ids": ids}
                prompts.append(nxt)
                queue.insert(0, nxt)
                bar.total += 1 + len(infer["budgets"])
                bar.refresh()
    return records, skipped


def _budget_config(
    engine: Dovetail, prompts: list[dict], infer: dict[str, Any], budget: int | str, seed: int
) -> tuple[InferConfig, dict[str, Any]]:
    """The InferConfig of one budget, and for `auto` the row's auto_choice / auto_profile: autotune profiles the
    candidate shapes on this bench's first prompts, on these devices."""
    if budget != "auto":
        return to_infer_config(infer, budget, seed), {}
    calib = [p["prompt_ids"] for p in prompts[:2]]
    cfg, profile = autotune(engine, calib, to_infer_config(infer, infer["budget"], seed))
    return cfg, {"auto_choice": {k: getattr(cfg, k) for k in ("budget", "depth", "top_k")}, "auto_profile": profile}


def evaluate_bench(engine, target: Target, name: str, questions: list, infer: dict, meta: dict, out: Path) -> list:
    """All budgets of one bench (baseline once); writes answers/<bench>_*.jsonl, returns summary rows."""
    seed, budgets = int(meta["seed"]), infer["budgets"]
    context = min(
        x for x in (infer["max_len"], getattr(engine, "max_len", None), target.config.max_position_embeddings) if x
    )
    limit_len = int(context) - int(infer["max_new_tokens"]) - max(_numeric(b) for b in budgets) - 1
    prompts, skipped = _prompts(target, questions, name, limit_len)
    if not prompts:
        log.warning("bench %s: no prompt fits the context of %d tokens; nothing to evaluate", name, context)
        return []
    bar = tqdm(total=len(prompts) * (1 + len(budgets)), desc=name, unit="prompt", disable=not infer["progress"])
    for _ in range(int(infer["warmup"])):  # warm up kernels and caches; not recorded
        engine.generate_baseline(
            prompts[0]["prompt_ids"],
            to_infer_config(infer, budgets[0], seed, max_new_tokens=min(8, infer["max_new_tokens"])),
        )
    bar.set_postfix_str("baseline")
    baseline, more = _run_baseline(engine, target, prompts, infer, seed, limit_len, bar, out / f"{name}_baseline.jsonl")
    base_by_key = {(r["question_id"], r["turn"]): r for r in baseline}
    rows = []
    for budget in budgets:
        bar.set_postfix_str(f"budget {budget}")
        cfg, auto = _budget_config(engine, prompts, infer, budget, seed)
        for _ in range(int(infer["warmup"])):
            engine.generate(
                prompts[0]["prompt_ids"], dataclasses.replace(cfg, max_new_tokens=min(8, cfg.max_new_tokens))
            )
        cuda = meta["draft_device"].startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats(meta["draft_device"])
        records = []
        with open(out / f"{name}_b{budget}.jsonl", "w", encoding="utf-8") as f:
            for p in prompts:
                rec = _record(p, engine.generate(p["prompt_ids"], cfg), target.tokenizer)
                rec["matches_baseline"] = rec["output_ids"] == base_by_key[(p["question_id"], p["turn"])]["output_ids"]
                records.append(rec)
                f.write(json.dumps(rec) + "\n")
                bar.update(1)
        row = {"bench": name, "budget": budget, "n_questions": len(questions), "n_skipped": skipped + more}
        row.update(summarize(records, baseline, int(cfg.depth)))
        row["peak_draft_mem_mb"] = torch.cuda.max_memory_allocated(meta["draft_device"]) / 2**20 if cuda else None
        row["peak_rss_mb"] = peak_rss_mb()
        row.update({k: getattr(cfg, k) for k in ROW_INFER_KEYS})
        row.update(draft_vocab=infer["draft_vocab"], **auto)
        row.update({k: v for k, v in meta.items() if k != "seed"})
        rows.append(row)
    bar.close()
    return rows


def _as_dict(cfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    if not isinstance(cfg, dict):
        raise TypeError(f"evaluate() takes a plain dict or a dataclass, got {type(cfg).__name__}")
    return dict(cfg)


def load_eval_target(cfg: dict[str, Any]) -> Target:
    """The target of `cfg['target']`, on `infer.target_device` when that is set."""
    spec = dict(cfg["target"])
    device = (cfg.get("infer") or {}).get("target_device")
    if not _missing(device):
        spec["device"] = device
    return load_target(spec)


def _read_draft(ckpt: Any) -> tuple[Path, dict[str, Any]]:
    """The draft dir of `cfg['ckpt']` and the facts each summary row repeats; fails before any model is loaded."""
    if _missing(ckpt):
        raise ValueError("ckpt is required: pass ckpt=/path/to/draft_dir (an exported draft dir with config.json)")
    ckpt = Path(str(ckpt)).expanduser()
    draft_meta = read_meta(ckpt)
    try:
        draft_cfg = DraftConfig.from_dict(json.loads((ckpt / CONFIG).read_text())).to_dict()
    except (OSError, ValueError, TypeError) as e:  # missing, bad JSON, unknown keys, bad values
        raise ValueError(f"{ckpt / CONFIG}: not a valid draft config ({e})") from e
    return ckpt, {
        "ckpt": str(ckpt),
        "draft_layers": draft_cfg.get("depth"),
        "fusion": draft_cfg.get("fusion"),
        "draft_params": draft_meta.get("trainable_params"),
    }


def _output_dir(cfg: dict[str, Any], output_dir: str | Path | None) -> Path:
    """`output_dir=`, else the config's output_dir (or Hydra's paths.output_dir), checked by check_output_dir."""
    out_dir = output_dir or cfg.get("output_dir") or (cfg.get("paths") or {}).get("output_dir")
    if _missing(out_dir):
        raise ValueError("no output dir: pass output_dir= (the Hydra entry uses the run's output dir)")
    return check_output_dir(str(out_dir))


def _infer_settings(cfg: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """`cfg['infer']` over INFER_DEFAULTS with `budgets` resolved, and the compile mode; every bad value raises
    ValueError here, before any model is loaded."""
    infer = {**INFER_DEFAULTS, **(cfg.get("infer") or {})}
    unknown = sorted(set(infer) - set(INFER_DEFAULTS) - {f.name for f in dataclasses.fields(InferConfig)})
    if unknown:
        raise ValueError(f"unknown infer keys {unknown}; known: {sorted(INFER_DEFAULTS)}")
    infer["budgets"] = [b if b == "auto" else int(b) for b in (infer["budgets"] or [infer["budget"]])]
    for b in infer["budgets"]:  # budget / depth / top_k <= 0
        to_infer_config(infer, 1 if b == "auto" else b, 0)
    ml = infer["max_len"]
    if ml is not None and (isinstance(ml, bool) or not isinstance(ml, int) or ml < 2):
        raise ValueError(f"infer.max_len must be null (the target's context) or an integer >= 2, got {ml!r}")
    mode = compile_mode(infer["compile"])
    check_draft_quant(infer["draft_quant"])
    return infer, mode


def _load_benches(cfg: dict[str, Any]) -> dict[str, list]:
    bench_cfg = cfg.get("bench") or {"name": "humaneval_pkg"}
    return {
        n: load_bench(n, bench_cfg.get("root"), bench_cfg.get("path"), bench_cfg.get("limit"))
        for n in bench_names(bench_cfg)
    }


def _run_meta(
    seed: int, draft_device: str, target: Target, draft: dict[str, Any], infer: dict[str, Any], mode: str | None
) -> dict[str, Any]:
    """The run's settings and facts; each summary row repeats all but the seed."""
    return {
        "seed": seed,
        "draft_device": draft_device,
        "target_device": str(target.device),
        "target_dtype": str(target.dtype).replace("torch.", ""),
        "target": target.spec.name,
        **draft,
        "compiled": mode or False,
        "draft_quant": infer["draft_quant"],
    }


def evaluate(cfg: dict[str, Any] | Any, output_dir: str | Path | None = None, target: Target | None = None) -> list:
    """Run every bench x budget for the draft in `cfg['ckpt']`; returns the summary rows (also in summary.json).

    `cfg` keys: ckpt, seed, target (a TargetSpec dict), infer, bench, output_dir (or `output_dir=`).
    A loaded `target` may be passed to reuse it across calls (e.g. a sweep).
    """
    cfg = _as_dict(cfg)
    ckpt, draft = _read_draft(cfg.get("ckpt"))
    out = _output_dir(cfg, output_dir)
    (out / "answers").mkdir(parents=True, exist_ok=True)
    infer, mode = _infer_settings(cfg)
    benches = _load_benches(cfg)
    seed = int(cfg.get("seed") or 0)
    torch.manual_seed(seed)
    target = target or load_eval_target(cfg)
    draft_device = resolve_device(infer["draft_device"])
    engine = Dovetail.from_pretrained(
        str(ckpt),
        target,
        draft_device=draft_device,
        draft_vocab=infer["draft_vocab"],
        compile=mode or False,
        draft_quant=infer["draft_quant"],
    )
    meta = _run_meta(seed, draft_device, target, draft, infer, mode)
    (out / "eval_config.json").write_text(json.dumps({**cfg, "infer": infer}, indent=2, default=str))
    rows = []
    for name, questions in benches.items():
        rows += evaluate_bench(engine, target, name, questions, infer, meta, out / "answers")
        (out / "summary.json").write_text(json.dumps(rows, indent=2))  # after each bench: partial runs keep results
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    if not rows:
        raise ValueError(
            f"nothing was evaluated: every prompt of {', '.join(benches)} was skipped (prompt + "
            f"infer.max_new_tokens={infer['max_new_tokens']} + budget past the context; infer.max_len="
            f"{infer['max_len']}); lower infer.max_new_tokens or pick shorter prompts"
        )
    write_report(rows, out)
    print(text_table(rows), flush=True)
    return rows


def _run_key(draft_dir: Path) -> tuple[int, int | str]:
    """Hydra job dirs 0, 1, ..., 10 in numeric order; other names after them, alphabetically."""
    name = draft_dir.parent.name
    return (0, int(name)) if name.isdigit() else (1, name)


def evaluate_sweep(cfg: dict[str, Any] | Any, output_dir: str | Path | None = None) -> list:
    """Evaluate every `<run>/draft` dir under `cfg['sweep']` with one loaded target; returns the rows.

    Each row is one run x bench x budget: the run's training facts from its dovetail.json (draft layers,
    fusion, trainable parameters, training time and steps, the training-time `val/sim_tau` as `sim_tau`),
    the config keys that differ between runs (e.g. `optim.lr`), then the measured metrics (tau, tokens/s,
    speedup, acceptance by draft position). Collected in sweep_summary.json / .csv / .md in the output dir;
    each run's own report goes to `<output dir>/<run>/`.
    """
    cfg = _as_dict(cfg)
    root = Path(str(cfg["sweep"])).expanduser()
    drafts = sorted((p for p in root.glob("*/draft") if (p / CONFIG).exists()), key=_run_key)
    if not drafts:
        raise FileNotFoundError(f"sweep={root}: no <run>/draft dirs with {CONFIG} under it")
    out = _output_dir(cfg, output_dir)  # fail before loading the target
    metas, failed = {}, {}
    for d in drafts:  # a broken draft is reported and skipped, not the end of the sweep
        try:
            metas[d.parent.name] = read_meta(d)
        except (OSError, ValueError) as e:
            failed[d.parent.name] = str(e)
    swept = varying_config(metas)
    target, rows = load_eval_target(cfg), []
    for d in drafts:
        run = d.parent.name
        if run in failed:
            continue
        try:
            run_rows = evaluate({**cfg, "ckpt": str(d), "sweep": None}, out / run, target)
        except (OSError, ValueError) as e:  # DraftMismatchError and bad files included
            failed[run] = str(e)
            log.error("sweep run %s: %s; skipped", run, e)
            continue
        rows += [{"run": run, **r, **run_summary(metas[run]), **swept[run]} for r in run_rows]
        write_sweep_report(rows, out)  # after each run: an interrupted sweep keeps what it measured
    (out / "sweep_failed.json").write_text(json.dumps(failed, indent=2))
    if not rows:
        raise ValueError(f"sweep={root}: no run could be evaluated: {failed}")
    write_sweep_report(rows, out)
    print(sweep_table(rows), flush=True)
    if failed:
        log.error("sweep: %d of %d runs failed (sweep_failed.json): %s", len(failed), len(drafts), sorted(failed))
    return rows
