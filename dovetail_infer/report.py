"""Evaluation reports: per bench x budget metrics, a plain-text table for the terminal, a Markdown table and
PNG plots vs budget."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def _mean(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize(records: list[dict[str, Any]], baseline: list[dict[str, Any]], depth: int) -> dict[str, Any]:
    """Aggregate one bench x budget: tau, tokens/s (per prompt, averaged), speedup, acceptance, time shares."""
    new, fwd = sum(r["new_tokens"] for r in records), sum(r["forwards"] for r in records)
    decoded = sum(r["new_tokens"] - 1 for r in records if r["forwards"])  # the first new token is prefill's
    accepts = [a for r in records for a in r["accept_lengths"]]
    hist = [0] * (max([depth, *accepts]) + 1)
    for a in accepts:
        hist[a] += 1
    # EAGLE-style conditional rate: P(draft token at depth d accepted | depths < d accepted)
    rate = [(sum(a > d for a in accepts) / n) if (n := sum(a >= d for a in accepts)) else None for d in range(depth)]
    # unconditional: fraction of target forwards that accepted a draft token at depth d+1
    frac = [sum(a > d for a in accepts) / len(accepts) if accepts else None for d in range(depth)]
    decode = sum(r["decode_s"] or 0.0 for r in records)
    tps, base_tps = _mean([r["tokens_per_s"] for r in records]), _mean([r["tokens_per_s"] for r in baseline])
    row = {
        "n_prompts": len(records),
        "tau": decoded / fwd if fwd else None,
        "tokens_per_s": tps,
        "tokens_per_s_median": statistics.median(t)
        if (t := [r["tokens_per_s"] for r in records if r["tokens_per_s"]])
        else None,
        "baseline_tokens_per_s": base_tps,
        "speedup": tps / base_tps if tps and base_tps else None,
        "matches_baseline": _mean([float(r["matches_baseline"]) for r in records]),
        "new_tokens": new,
        "forwards": fwd,
        "accept_hist": hist,
        "accept_rate_by_depth": rate,
        "accept_frac_by_depth": frac,
        "prefill_s": _mean([r["prefill_s"] for r in records]),
        "baseline_prefill_s": _mean([r["prefill_s"] for r in baseline]),
        "transfer_bytes": _mean([r["transfer_bytes"] for r in records]),
        # prompt lookup (infer.lookup): share of forwards that verified a looked-up chain, tokens accepted from it
        "lookup_share": sum(r.get("lookup_forwards", 0) for r in records) / fwd if fwd else None,
        "lookup_accepted": sum(r.get("lookup_accepted", 0) for r in records),
    }
    for part in ("draft", "verify", "transfer", "other"):
        total = sum(r[f"{part}_s"] or 0.0 for r in records)
        row[f"{part}_share"] = total / decode if decode else None
    return row


# (summary key, column header, format)
COLUMNS = [
    ("bench", "bench", "{}"),
    ("budget", "budget", "{}"),
    ("n_prompts", "prompts", "{}"),
    ("tau", "tau", "{:.2f}"),
    ("tokens_per_s", "tok/s", "{:.1f}"),
    ("baseline_tokens_per_s", "base tok/s", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("matches_baseline", "match", "{:.0%}"),
    ("prefill_s", "prefill s", "{:.3f}"),
    ("draft_share", "draft", "{:.0%}"),
    ("verify_share", "verify", "{:.0%}"),
    ("transfer_share", "transfer", "{:.0%}"),
    ("other_share", "other", "{:.0%}"),
    ("n_skipped", "skipped", "{}"),
]


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def _cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [h for _, h, _ in COLUMNS]
    return header, [[_cell(r, k, f) for k, _, f in COLUMNS] for r in rows]


def text_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table that fits one screen (one line per bench x budget)."""
    header, body = _cells(rows)
    widths = [max(len(c) for c in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, body)])


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The same table in GitHub Markdown."""
    header, body = _cells(rows)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(out)


def plot_vs_budget(
    rows: list[dict[str, Any]], key: str, path: str | Path, ylabel: str, ref_key: str | None = None
) -> Path:
    """One line per bench: `key` against the draft-token budget, saved as a PNG (Agg backend);
    `ref_key` (e.g. the baseline's tokens/s) is drawn dashed in the bench's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for bench in dict.fromkeys(r["bench"] for r in rows):
        pts = sorted(
            (r["budget"], r[key])
            for r in rows
            if r["bench"] == bench and r.get(key) is not None and isinstance(r["budget"], int)  # not "auto"
        )
        if pts:
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=bench)
            ref = next((r[ref_key] for r in rows if r["bench"] == bench and r.get(ref_key) is not None), None)
            if ref_key and ref is not None:
                ax.axhline(ref, color=line.get_color(), linestyle="--", linewidth=1, label=f"{bench} baseline")
    budgets = sorted({r["budget"] for r in rows if isinstance(r["budget"], int)})
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("draft-token budget")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_report(rows: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """summary.md, tau_vs_budget.png and tokens_per_s_vs_budget.png in `out_dir`."""
    out = Path(out_dir)
    md = out / "summary.md"
    md.write_text("# Dovetail evaluation\n\n" + markdown_table(rows) + "\n")
    return [
        md,
        plot_vs_budget(rows, "tau", out / "tau_vs_budget.png", "τ (mean accepted length)"),
        plot_vs_budget(rows, "tokens_per_s", out / "tokens_per_s_vs_budget.png", "tokens/s", "baseline_tokens_per_s"),
    ]


# --- sweeps: one row per run x bench x budget -------------------------------------------------------------------
# Leading columns of sweep_summary.csv: the run, what it was trained as, then the measured metrics.
SWEEP_FIRST = [
    "run", "bench", "budget", "draft_layers", "fusion", "draft_params", "train_seconds", "train_steps",
    "sim_tau", "tau", "tokens_per_s", "baseline_tokens_per_s", "speedup", "matches_baseline",
]  # fmt: skip
SWEEP_COLUMNS = [
    ("run", "run", "{}"),
    ("draft_layers", "layers", "{}"),
    ("fusion", "fusion", "{}"),
    ("draft_params", "params", "{:,}"),
    ("train_seconds", "train s", "{:.0f}"),
    ("bench", "bench", "{}"),
    ("budget", "budget", "{}"),
    ("sim_tau", "val sim_tau", "{:.2f}"),
    ("tau", "tau", "{:.2f}"),
    ("tokens_per_s", "tok/s", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"),
]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def run_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """Training facts of one exported draft (its dovetail.json): time, steps and validation metrics, where the
    training-time `val/sim_tau` becomes `sim_tau` so it sits beside the measured `tau`."""
    summary = meta.get("summary") or {}
    metrics = summary.get("metrics") or {}
    return {
        "train_seconds": summary.get("train_seconds"),
        "train_steps": summary.get("global_step"),
        "sim_tau": metrics.get("val/sim_tau"),
        "val_top1_acc": metrics.get("val/top1_acc"),
        "val_loss": metrics.get("val/loss"),
    }


def varying_config(metas: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per run, the flattened training-config keys (e.g. `optim.lr`) whose values differ between the runs:
    the swept parameters, without the keys every run shares."""
    flat = {run: _flatten((m.get("summary") or {}).get("config") or {}) for run, m in metas.items()}
    keys = list(dict.fromkeys(k for f in flat.values() for k in f))
    varying = [k for k in keys if len({repr(f.get(k)) for f in flat.values()}) > 1 and not k.startswith("hydra")]
    return {run: {k: f.get(k) for k in varying} for run, f in flat.items()}


def sweep_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of a sweep: one line per run x bench x budget."""
    header = [h for _, h, _ in SWEEP_COLUMNS]
    body = [[_cell(r, k, f) for k, _, f in SWEEP_COLUMNS] for r in rows]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in body])


def write_sweep_report(rows: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """sweep_summary.json (full rows), sweep_summary.csv (lists as JSON strings) and sweep_summary.md."""
    import csv
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "sweep_summary.json", out / "sweep_summary.csv", out / "sweep_summary.md"]
    paths[0].write_text(json.dumps(rows, indent=2))
    seen = list(dict.fromkeys(k for r in rows for k in r))
    keys = [k for k in SWEEP_FIRST if k in seen] + [k for k in seen if k not in SWEEP_FIRST]
    with open(paths[1], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in r.items()} for r in rows)
    paths[2].write_text("# Dovetail sweep\n\n" + sweep_table(rows) + "\n")
    return paths
