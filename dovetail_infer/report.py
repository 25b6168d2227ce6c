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
        "tau": new / fwd if fwd else None,
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
        pts = sorted((r["budget"], r[key]) for r in rows if r["bench"] == bench and r.get(key) is not None)
        if pts:
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=bench)
            ref = next((r[ref_key] for r in rows if r["bench"] == bench and r.get(ref_key) is not None), None)
            if ref_key and ref is not None:
                ax.axhline(ref, color=line.get_color(), linestyle="--", linewidth=1, label=f"{bench} baseline")
    budgets = sorted({r["budget"] for r in rows})
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
