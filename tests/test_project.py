"""benchmarks/project.py: the projection arithmetic, acceptance pooling and the predict command (no model runs)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT


def _load_project():
    spec = importlib.util.spec_from_file_location("project", ROOT / "benchmarks" / "project.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("project", module)  # dataclasses and annotations look their module up by name
    spec.loader.exec_module(module)
    return module


project = _load_project()


def test_tree_tokens_is_the_budget_or_every_candidate():
    assert project.tree_tokens(15, 8, 10) == 15  # the paper's tree: 16 rows verified with the root
    assert project.tree_tokens(4, 4, 1) == 4  # a chain of its depth
    assert project.tree_tokens(8, 3, 1) == 3  # a chain is never longer than its depth
    assert project.tree_tokens(100, 3, 2) == 2 + 2 * 4  # top_k children of the root, then top_k² per level
    with pytest.raises(ValueError):
        project.tree_tokens(0, 1, 1)


def test_interp_ms_is_exact_where_measured_linear_between_and_never_extrapolates():
    ms = {1: 400.0, 4: 560.0, 8: 1000.0}
    assert project.interp_ms(ms, 4) == 560.0
    assert project.interp_ms(ms, 6) == pytest.approx(780.0)
    assert project.interp_ms(ms, 2) == pytest.approx(400 + 160 / 3)
    for k in (0, 9):
        with pytest.raises(ValueError, match="outside the measured k"):
            project.interp_ms(ms, k)


def test_transfer_bytes_follow_the_engines_accounting():
    # 16 rows verified: ids and parents as int64; 3 new tokens: a bf16 hidden state of 4096 and an int64 id each
    assert project.transfer_bytes_per_step(16, 3, 4096, 2) == 16 * 16 + 3 * (4096 * 2 + 8)


def test_project_splits_the_step_and_rates_it_against_target_only():
    p = project.project(3.0, verify_ms=600.0, baseline_ms=400.0, draft_ms=30.0, overhead_ms=2.0)
    assert p["step_ms"] == pytest.approx(632.0)
    assert p["transfer_ms"] == 0.0  # one device: no bandwidth given
    assert p["tokens_per_s"] == pytest.approx(3000 / 632)
    assert p["baseline_tokens_per_s"] == pytest.approx(2.5)
    assert p["speedup"] == pytest.approx(3 * 400 / 632)
    assert p["break_even_tau"] == pytest.approx(632 / 400)  # at this τ the speedup is 1
    at_break_even = project.project(p["break_even_tau"], 600.0, 400.0, draft_ms=30.0, overhead_ms=2.0)
    assert at_break_even["speedup"] == pytest.approx(1.0)


def test_project_transfer_time_is_bytes_over_bandwidth_plus_latency():
    p = project.project(2.0, 100.0, 50.0, transfer_bytes=16e6, gbps=16.0, latency_ms=0.06)
    assert p["transfer_ms"] == pytest.approx(1.0 + 0.06)
    assert p["step_ms"] == pytest.approx(101.06)


def test_project_refuses_impossible_inputs():
    with pytest.raises(ValueError, match="τ"):
        project.project(0.5, 100.0, 50.0)
    with pytest.raises(ValueError, match="> 0"):
        project.project(2.0, 0.0, 50.0)


def test_tau_for_inverts_tokens_per_s():
    p = project.project(2.4, 1000.0, 400.0, draft_ms=20.0)
    assert project.tau_for(p["tokens_per_s"], p["step_ms"]) == pytest.approx(2.4)


def _row(bench, forwards, tau, hist, budget=8):
    return {"bench": bench, "budget": budget, "depth": 3, "top_k": 2, "min_prob": 0.0, "draft_vocab": None,
            "forwards": forwards, "tau": tau, "accept_hist": hist}  # fmt: skip


def test_acceptance_pools_benches_of_a_shape_by_forwards():
    rows = [_row("a", 10, 2.0, [2, 5, 3, 0]), _row("b", 30, 3.0, [0, 10, 10, 10]), _row("c", 5, 1.5, [5], budget=4)]
    rows.append({**_row("d", 4, 9.0, [4]), "budget": "auto"})  # autotune rows have no fixed shape
    pooled = {a["budget"]: a for a in project.acceptance_by_shape(rows)}
    assert set(pooled) == {8, 4}
    a = pooled[8]
    assert a["benches"] == ["a", "b"] and a["forwards"] == 40
    assert a["tau"] == pytest.approx((10 * 2 + 30 * 3) / 40)
    hist = [2, 15, 13, 10]  # summed: accepted lengths 0..3 over 40 steps
    assert a["accept_frac_by_depth"] == pytest.approx([38 / 40, 23 / 40, 10 / 40])
    assert a["expected_accepted"] == pytest.approx(sum(i * n for i, n in enumerate(hist)) / 40)
    assert a["expected_accepted"] == pytest.approx(sum(a["accept_frac_by_depth"]))


def test_load_rows_reads_summaries_and_results_files(tmp_path):
    rows = [_row("a", 10, 2.0, [2, 5, 3, 0])]
    (tmp_path / "summary.json").write_text(json.dumps(rows))
    (tmp_path / "results.json").write_text(json.dumps({"stamp": {}, "rows": rows}))
    assert project.load_rows(tmp_path / "summary.json") == rows == project.load_rows(tmp_path / "results.json")
    (tmp_path / "bad.json").write_text(json.dumps({"rows": 3}))
    with pytest.raises(ValueError, match="summary rows"):
        project.load_rows(tmp_path / "bad.json")


def test_the_shipped_summary_gives_the_paper_shape():
    acc = project.acceptance_by_shape(
        project.load_rows(ROOT / "benchmarks/results/shipped_draft/evaluate_paper_tree.json")
    )
    assert [(a["budget"], a["depth"], a["top_k"]) for a in acc] == [project.PAPER_SHAPE]
    assert 1 < acc[0]["tau"] < 1 + project.PAPER_SHAPE[1]


def test_parse_shape():
    assert project.parse_shape("4,3,2,4096") == (4, 3, 2, 4096)
    assert project.parse_shape("15,8,10") == project.parse_shape("15,8,10,none") == (15, 8, 10, None)


def test_predict_writes_a_row_per_shape_and_draft_step(tmp_path):
    vc = {"target": "llama2_7b_shape", "quant": "int4", "dtype": "bfloat16", "context": 512,
          "ms": {"1": 400.0, "4": 560.0, "16": 1800.0}}  # fmt: skip
    (tmp_path / "vc.json").write_text(json.dumps(vc))
    (tmp_path / "acc.json").write_text(json.dumps([_row("a", 10, 2.0, [2, 5, 3, 0], budget=3)]))
    out = tmp_path / "pred.json"
    args = ["predict", "--verify-cost", tmp_path / "vc.json", "--accept", tmp_path / "acc.json", "--tau", "3", "4"]
    args += ["--shape", "15", "8", "10", "--shape", "2", "2", "1"]  # τ 4 > depth + 1 of the chain: skipped
    cmd = [sys.executable, "benchmarks/project.py", *args, "--draft-step-ms", "1", "5", "--out", out]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)  # the script as users run it
    res = json.loads(out.read_text())
    assert "| b15 d8 k10 |" in out.with_suffix(".md").read_text()
    assert res["commit"] and res["assumed"]["draft_step_ms"] == [1.0, 5.0]
    assert res["hidden_size"] == 4096  # from conf/target/llama2_7b_shape.yaml
    by = {(r["shape"], r["source"] != "assumed τ", r["draft_step_ms"], r["tau"]): r for r in res["rows"]}
    assert len(by) == 2 * (1 + 2 + 1)  # draft steps x (the summary's shape, τ 3 and 4 at the paper's, τ 3 at b2)
    assert res["skipped"] == ["b2 d2 k1 (assumed τ): τ 4 > depth + 1, more than a step can make"]
    measured = by[("b3 d3 k2", True, 5.0, 2.0)]  # 3 draft tokens + the root: T(4), 3 levels of 5 ms
    assert measured["k"] == 4 and measured["verify_ms"] == 560.0 and measured["draft_ms"] == 15.0
    paper = by[("b15 d8 k10", False, 1.0, 3.0)]  # assumed τ at the paper's shape: T(16), 8 levels
    assert paper["verify_ms"] == 1800.0 and paper["draft_ms"] == 8.0 and paper["tau"] == 3.0
    assert paper["transfer_bytes"] == project.transfer_bytes_per_step(16, 3.0, 4096, 2)
    assert paper["tokens_per_s"] == pytest.approx(3000 / paper["step_ms"])
    assert res["paper"]["tokens_per_s"] == 5.86 and res["paper"]["speedup"] == 2.77


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")
def test_gpu_check_answers_no_cuda_in_one_json_line():
    proc = subprocess.run(["scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["status"] == "no cuda"
