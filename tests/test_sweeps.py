"""Sweeps through the real entry points: the depth x fusion ablation trains twelve drafts, `evaluate.py sweep=`
collects them into one table beside their training facts, and the Optuna search runs its trials."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from itertools import product

import pytest
import yaml
from conftest import ROOT, target_spec
from helpers.train import run_train

pytestmark = pytest.mark.slow  # train.py and evaluate.py sweeps in subprocesses

SHAREGPT = ROOT / "data" / "sharegpt" / "sharegpt_v3_first_turn_1000.json"


def run_evaluate(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "DOVETAIL_CACHE": target_spec("tiny_random")["cache_dir"]}
    cmd = [sys.executable, "evaluate.py", "target=tiny_random", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.skipif(not SHAREGPT.exists(), reason="data/sharegpt prompts not present")
def test_ablation_depth_trains_twelve_drafts_and_evaluate_collects_them(tmp_path):
    sweep, out = tmp_path / "sweep", tmp_path / "eval"
    run_train("experiment=ablation_depth", "debug=fdr", "data.limit=8", f"hydra.sweep.dir={sweep}", multirun=True)
    configs = [json.loads(p.read_text()) for p in sweep.glob("*/draft/config.json")]
    assert sorted((c["depth"], c["fusion"]) for c in configs) == sorted(product(range(1, 7), ["dgf", "concat"]))

    bench = tmp_path / "q.jsonl"
    bench.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["Who wrote Hamlet?"]}) + "\n")
    run_evaluate(
        f"sweep={sweep}", "bench=custom", f"bench.path={bench}", "infer.budgets=[2,4]", "infer.depth=2",
        "infer.top_k=2", "infer.max_new_tokens=4", "infer.warmup=0", "infer.progress=false", f"hydra.run.dir={out}",
    )  # fmt: skip
    rows = json.loads((out / "sweep_summary.json").read_text())
    assert [r["run"] for r in rows] == [str(i) for i in range(12) for _ in (2, 4)]  # numeric job order
    assert {(r["draft_layers"], r["fusion"], r["budget"]) for r in rows} == set(
        product(range(1, 7), ["dgf", "concat"], [2, 4])
    )
    for r in rows:
        meta = json.loads((sweep / r["run"] / "draft" / "dovetail.json").read_text())
        assert r["sim_tau"] == meta["summary"]["metrics"]["val/sim_tau"] and r["sim_tau"] >= 1.0
        assert r["train_seconds"] == meta["summary"]["train_seconds"] > 0
        assert r["draft_params"] == meta["trainable_params"] > 0
        assert (r["draft.depth"], r["draft.fusion"]) == (r["draft_layers"], r["fusion"])  # the swept keys
        assert r["tau"] >= 1.0 and r["tokens_per_s"] > 0 and r["speedup"] > 0
    with open(out / "sweep_summary.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 24 and list(table[0])[:9] == [
        "run", "bench", "budget", "draft_layers", "fusion", "draft_params", "train_seconds", "train_steps", "sim_tau",
    ]  # fmt: skip
    assert len(json.loads(table[0]["accept_rate_by_depth"])) == 2
    assert "| 11 | 6 | concat |" in (out / "sweep_summary.md").read_text()


def test_optuna_search_maximises_val_tau(tmp_path):
    run_train("hparams_search=optuna", "debug=fdr", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}")
    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"optim.lr", "loss.noise_std", "loss.w_tok"}
    assert result["best_value"] >= 1.0  # val/tau: tokens per target forward of real speculative decoding
    lrs = {
        json.loads(p.read_text())["summary"]["config"]["optim"]["lr"] for p in tmp_path.glob("*/draft/dovetail.json")
    }
    assert len(lrs) == 2 and all(1e-4 <= lr <= 5e-3 for lr in lrs)


REPLIES = SHAREGPT.parent / "sharegpt_smollm2_replies.jsonl"


@pytest.mark.skipif(not REPLIES.exists(), reason="data/sharegpt replies not present")
def test_cpu_draft_experiment_trains_a_one_layer_draft_on_the_shared_replies(tmp_path):
    proc = run_train("experiment=cpu_draft", "debug=fdr", "data.limit=8", f"hydra.run.dir={tmp_path}")
    conf = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert conf["depth"] == 1 and conf["fusion"] == "dgf"
    meta = json.loads((tmp_path / "draft" / "dovetail.json").read_text())
    assert meta["summary"]["data"]["train_examples"] > 0
    assert "regenerate:" not in proc.stdout + proc.stderr  # the file's replies are used as they are
