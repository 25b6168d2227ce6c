"""budget=auto: the profile covers every candidate and the choice is the best predicted tokens/s."""

from __future__ import annotations

import json

import torch
from conftest import target_spec

from dovetail_infer.autotune import autotune
from dovetail_infer.checkpoint import save_draft
from dovetail_infer.engine import Dovetail, InferConfig
from dovetail_infer.evaluate import evaluate
from dovetail_infer.models.draft import DraftConfig, DraftModel


def test_autotune_picks_the_best_predicted_shape(tiny_target):
    torch.manual_seed(0)
    draft = DraftModel(DraftConfig.from_target(tiny_target.config, depth=1))
    eng = Dovetail(tiny_target, draft, "cpu")
    prompt = tiny_target.apply_chat_template([{"role": "user", "content": "Count to five."}])
    cands = ((2, 2, 1), (4, 2, 2))
    cfg, table = autotune(eng, [prompt], InferConfig(max_new_tokens=8), candidates=cands, max_new_tokens=8)
    assert [(r["budget"], r["depth"], r["top_k"]) for r in table] == list(cands)
    best = max(table, key=lambda r: r["predicted_tokens_per_s"])
    assert (cfg.budget, cfg.depth, cfg.top_k) == (best["budget"], best["depth"], best["top_k"])
    assert cfg.max_new_tokens == 8 and all(r["tau"] >= 1 and r["verify_s_per_forward_ms"] > 0 for r in table)


def test_evaluate_with_auto_budget(tiny_target, tmp_path):
    torch.manual_seed(0)
    draft = DraftModel(DraftConfig.from_target(tiny_target.config, depth=1))
    ckpt = save_draft(draft, tmp_path / "draft", tiny_target.identity())
    bench = tmp_path / "q.jsonl"
    bench.write_text(json.dumps({"question_id": 1, "category": "x", "turns": ["Say hi."]}) + "\n")
    cfg = {
        "ckpt": str(ckpt),
        "target": target_spec("tiny_random"),
        "infer": {"budgets": [2, "auto"], "max_new_tokens": 6, "warmup": 0, "progress": False, "draft_device": "cpu"},
        "bench": {"name": "custom", "path": str(bench)},
    }
    rows = evaluate(cfg, output_dir=tmp_path / "out", target=tiny_target)
    auto = [r for r in rows if r["budget"] == "auto"]
    assert len(auto) == 1 and auto[0]["auto_choice"]["budget"] >= 1 and len(auto[0]["auto_profile"]) >= 2
    assert auto[0]["matches_baseline"] == 1.0
    assert (tmp_path / "out" / "answers" / "custom_bauto.jsonl").exists()
    assert (tmp_path / "out" / "tau_vs_budget.png").exists()
