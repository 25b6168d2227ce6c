"""`budget=auto`: pick the draft-token budget, depth and top-k with the best tokens/s on *these* devices.

The right budget depends on the hardware: a GPU verifier pays almost nothing for extra draft tokens,
a CPU verifier pays more, and a draft on a CPU costs a head projection per tree level. So we profile:
for each candidate shape, a short calibration decode measures τ (accepted length, from this draft on
these prompts), the draft time and the verification time per target forward, and the model

    tokens/s ≈ τ / (draft_s + verify_s + transfer_s + other_s)   (per target forward)

ranks the candidates. The table behind the choice is returned (and logged) so users can see why.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from dovetail_infer.engine import Dovetail, InferConfig

log = logging.getLogger(__name__)

# (budget, depth, top_k): chains and small trees, the range the paper finds useful for a CPU verifier
CANDIDATES: tuple[tuple[int, int, int], ...] = (
    (1, 1, 1),
    (2, 2, 1),
    (3, 3, 1),
    (4, 4, 1),
    (6, 6, 1),
    (4, 3, 2),
    (8, 4, 2),
    (8, 6, 4),
    (16, 6, 4),
)


def autotune(
    engine: Dovetail,
    prompts: list[list[int]],
    base: InferConfig | None = None,
    candidates: tuple[tuple[int, int, int], ...] = CANDIDATES,
    max_new_tokens: int = 32,
) -> tuple[InferConfig, list[dict[str, Any]]]:
    """Return the best InferConfig (base's other settings kept) and the per-candidate profile."""
    if not prompts:
        raise ValueError("autotune needs at least one calibration prompt")
    base = base or InferConfig()
    table = []
    for budget, depth, top_k in candidates:
        cfg = replace(base, budget=budget, depth=depth, top_k=top_k, max_new_tokens=max_new_tokens)
        engine.generate(prompts[0], replace(cfg, max_new_tokens=4))  # warm-up
        runs = [engine.generate(p, cfg) for p in prompts]
        fwd = sum(r.forwards for r in runs)
        if not fwd:
            continue
        tau = sum(r.new_tokens - 1 for r in runs if r.forwards) / fwd
        per = {k: sum(getattr(r, k) for r in runs) / fwd for k in ("draft_s", "verify_s", "transfer_s", "other_s")}
        step = sum(per.values())
        table.append(
            {
                "budget": budget,
                "depth": depth,
                "top_k": top_k,
                "tau": round(tau, 3),
                **{f"{k}_per_forward_ms": round(v * 1e3, 2) for k, v in per.items()},
                "predicted_tokens_per_s": round(tau / step, 2) if step > 0 else 0.0,
            }
        )
    if not table:
        return base, table
    best = max(table, key=lambda r: r["predicted_tokens_per_s"])
    log.info(
        "budget=auto chose budget %d, depth %d, top_k %d (τ %.2f, %.1f tokens/s predicted) from %d candidates",
        best["budget"],
        best["depth"],
        best["top_k"],
        best["tau"],
        best["predicted_tokens_per_s"],
        len(table),
    )
    return replace(base, budget=best["budget"], depth=best["depth"], top_k=best["top_k"]), table
