"""evaluate(): benchmarks x budgets on the tiny random target with a random draft; bench loading; the Hydra entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, target_spec

from dovetail_infer.bench import KNOWN_BENCHES, Question, conversation, load_bench, read_questions
from dovetail_infer.checkpoint import save_draft
from dovetail_infer.evaluate import evaluate, evaluate_sweep
from dovetail_infer.models.draft import DraftConfig, DraftModel
from dovetail_infer.report import text_table

QUESTIONS = [
    {"question_id": 1, "category": "qa", "turns": ["Who wrote Hamlet?"]},
    {"question_id": 2, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it about snow."]},
]
SUMMARY_KEYS = {
    "bench", "budget", "tau", "tokens_per_s", "baseline_tokens_per_s", "speedup", "accept_hist",
    "accept_rate_by_depth", "prefill_s", "draft_share", "verify_share", "transfer_share", "other_share",
    "peak_draft_mem_mb", "peak_rss_mb", "n_questions", "n_prompts", "n_skipped", "depth", "top_k",
    "draft_device", "target_device", "target_dtype", "ckpt", "matches_baseline",
}  # fmt: skip


# --- fixtures -------------------------------------------------------------------------------------------------
def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def draft_dir(tiny_target, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    draft = DraftModel(DraftConfig.from_target(tiny_target.config, depth=1))
    return save_draft(draft, tmp_path_factory.mktemp("ckpt") / "draft", tiny_target.identity())


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("bench") / "question.jsonl", QUESTIONS)


def _cfg(draft_dir: Path, bench_file: Path, **infer) -> dict:
    return {
        "ckpt": str(draft_dir),
        "seed": 0,
        "target": target_spec("tiny_random"),
        "infer": {
            "budgets": [2, 4],
            "depth": 2,
            "top_k": 2,
            "max_new_tokens": 8,
            "warmup": 1,
            "progress": False,
            **infer,
        },
        "bench": {"name": "custom", "path": str(bench_file), "limit": None},
    }


@pytest.fixture(scope="module")
def run(tiny_target, draft_dir, bench_file, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("eval")
    return out, evaluate(_cfg(draft_dir, bench_file), out, target=tiny_target)


def _answers(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- evaluate() -----------------------------------------------------------------------------------------------
def test_writes_answers_summary_and_plots(run):
    out, rows = run
    for name in ("custom_b2.jsonl", "custom_b4.jsonl", "custom_baseline.jsonl"):
        assert len(_answers(out / "answers" / name)) == 3  # 2 questions, one of them two-turn
    assert json.loads((out / "summary.json").read_text()) == rows
    assert "| custom | 2 |" in (out / "summary.md").read_text()
    import matplotlib.image

    for png in ("tau_vs_budget.png", "tokens_per_s_vs_budget.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(out / png).shape[0] > 100


def test_summary_rows(run):
    _, rows = run
    assert [(r["bench"], r["budget"]) for r in rows] == [("custom", 2), ("custom", 4)]
    for r in rows:
        assert SUMMARY_KEYS <= set(r), SUMMARY_KEYS - set(r)
        assert r["tau"] >= 1.0
        assert r["tokens_per_s"] > 0 and r["baseline_tokens_per_s"] > 0 and r["speedup"] > 0
        assert r["matches_baseline"] == 1.0  # greedy: speculative outputs equal the baseline's
        assert (r["n_questions"], r["n_prompts"], r["n_skipped"]) == (2, 3, 0)
        assert sum(r["accept_hist"]) == r["forwards"] and len(r["accept_rate_by_depth"]) == 2
        assert r["peak_draft_mem_mb"] is None and r["peak_rss_mb"] > 0
        assert (r["draft_device"], r["target_device"], r["target_dtype"]) == ("cpu", "cpu", "float32")
        shares = [r[f"{p}_share"] for p in ("draft", "verify", "transfer", "other")]
        assert all(0 <= s <= 1.0001 for s in shares)


def test_prompt_ids_and_two_turns(run, tiny_target):
    out, _ = run
    base = {(a["question_id"], a["turn"]): a for a in _answers(out / "answers" / "custom_baseline.jsonl")}
    assert set(base) == {(1, 0), (2, 0), (2, 1)}
    q2 = Question(**QUESTIONS[1])
    expected = {
        (1, 0): tiny_target.apply_chat_template([{"role": "user", "content": "Who wrote Hamlet?"}]),
        (2, 0): tiny_target.apply_chat_template(conversation(q2, [], 0)),
        # the second turn follows the model's own first answer
        (2, 1): tiny_target.apply_chat_template(conversation(q2, [base[(2, 0)]["text"]], 1)),
    }
    for b in (2, 4):
        for a in _answers(out / "answers" / f"custom_b{b}.jsonl"):
            key = (a["question_id"], a["turn"])
            assert a["prompt_ids"] == expected[key] == base[key]["prompt_ids"]
            assert a["matches_baseline"] and a["output_ids"] == base[key]["output_ids"]
            assert 0 < a["new_tokens"] == len(a["output_ids"]) <= 8
    assert conversation(q2, ["A1"], 1)[1] == {"role": "assistant", "content": "A1"}


def test_too_long_prompts_are_skipped(tiny_target, draft_dir, tmp_path):
    rows = [{"question_id": 7, "turns": ["word " * 3000]}, QUESTIONS[0]]
    cfg = _cfg(draft_dir, _write_jsonl(tmp_path / "q.jsonl", rows), budgets=[2], warmup=0)
    (row,) = evaluate(cfg, tmp_path / "out", target=tiny_target)
    assert (row["n_questions"], row["n_prompts"], row["n_skipped"]) == (2, 1, 1)


def test_nothing_evaluated_is_an_error_not_exit_0(tiny_target, draft_dir, tmp_path):
    rows = [{"question_id": 7, "turns": ["word " * 3000]}]
    cfg = _cfg(draft_dir, _write_jsonl(tmp_path / "q.jsonl", rows), budgets=[2], warmup=0)
    with pytest.raises(ValueError, match="nothing was evaluated"):
        evaluate(cfg, tmp_path / "out", target=tiny_target)
    with pytest.raises(ValueError, match="infer.max_len"):
        evaluate(_cfg(draft_dir, _write_jsonl(tmp_path / "q2.jsonl", QUESTIONS), max_len=-1), tmp_path / "o2")


def test_duplicate_question_ids_are_refused(tmp_path):
    """Answers are matched to their baseline by question_id: a repeated id would compare two questions."""
    path = _write_jsonl(tmp_path / "dup.jsonl", [QUESTIONS[0], QUESTIONS[1], {**QUESTIONS[1], "turns": ["x"]}])
    with pytest.raises(ValueError, match=r"dup\.jsonl:3: question_id 2 repeats line 2"):
        read_questions(path)


def test_sweep_skips_a_broken_draft_and_reports_it(tiny_target, draft_dir, bench_file, tmp_path):
    import shutil

    for run in ("run_a", "run_b"):
        shutil.copytree(draft_dir, tmp_path / "sweep" / run / "draft")
    (tmp_path / "sweep" / "run_a" / "draft" / "model.safetensors").write_bytes(b"broken")
    cfg = {**_cfg(draft_dir, bench_file, budgets=[2], max_new_tokens=4, warmup=0), "sweep": str(tmp_path / "sweep")}
    cfg["bench"]["limit"] = 1
    rows = evaluate_sweep(cfg, tmp_path / "out")
    assert [r["run"] for r in rows] == ["run_b"]
    failed = json.loads((tmp_path / "out" / "sweep_failed.json").read_text())
    assert list(failed) == ["run_a"] and "not a valid safetensors file" in failed["run_a"]


def test_missing_ckpt_is_a_clear_error(bench_file, tmp_path):
    with pytest.raises(ValueError, match="ckpt is required"):
        evaluate({**_cfg(tmp_path, bench_file), "ckpt": "???"}, tmp_path)
    with pytest.raises(FileNotFoundError, match="not a Dovetail draft dir"):
        evaluate(_cfg(tmp_path / "nope", bench_file), tmp_path)


def test_sweep_collects_runs(tiny_target, draft_dir, bench_file, tmp_path):
    import shutil

    for run in ("run_a", "run_b"):
        shutil.copytree(draft_dir, tmp_path / "sweep" / run / "draft")
    cfg = {**_cfg(draft_dir, bench_file, budgets=[2], max_new_tokens=4, warmup=0), "sweep": str(tmp_path / "sweep")}
    cfg["bench"]["limit"] = 1
    rows = evaluate_sweep(cfg, tmp_path / "out")
    assert [(r["run"], r["budget"], r["draft_layers"], r["fusion"]) for r in rows] == [
        ("run_a", 2, 1, "dgf"),
        ("run_b", 2, 1, "dgf"),
    ]
    assert (tmp_path / "out" / "run_a" / "summary.json").exists()
    assert (tmp_path / "out" / "sweep_summary.csv").read_text().startswith("run,bench,budget")


# --- bench loading --------------------------------------------------------------------------------------------
def test_bench_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.jsonl")):
        load_bench("custom", path=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="bench.path"):
        load_bench("custom", path="???")
    with pytest.raises(ValueError, match="unknown bench 'nope'.*mt_bench.*humaneval_pkg"):
        load_bench("nope")
    with pytest.raises(FileNotFoundError, match=r"mt_bench.question\.jsonl"):
        load_bench("mt_bench", root=tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(QUESTIONS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        read_questions(bad)
    bad.write_text(json.dumps({"question_id": 1, "turns": []}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: field 'turns'"):
        read_questions(bad)


def test_humaneval_pkg_and_limit(bench_file):
    qs = load_bench("humaneval_pkg")
    assert len(qs) == 164 and qs[0].question_id == "HumanEval/0"
    assert qs[0].turns[0].startswith("Complete the following Python function:\n```python\nfrom typing import List")
    assert qs[0].turns[0].endswith("```")
    assert len(load_bench("humaneval_pkg", limit=3)) == 3
    assert [q.question_id for q in load_bench("custom", path=bench_file, limit=1)] == [1]
    assert set(KNOWN_BENCHES) >= {"mt_bench", "humaneval", "gsm8k", "alpaca", "qa", "sum", "custom"}


def test_shared_mt_bench_has_two_turns():
    root = ROOT / "data" / "bench"
    if not (root / "mt_bench" / "question.jsonl").exists():
        pytest.skip("data/bench not present")
    qs = load_bench("mt_bench", root=root, limit=2)
    assert len(qs) == 2 and all(len(q.turns) == 2 for q in qs)


def test_text_table_handles_missing_values():
    table = text_table([{"bench": "qa", "budget": 4, "tau": 1.5, "speedup": None}])
    assert "qa" in table and "1.50" in table and "-" in table


# --- the Hydra entry ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_hydra_entry(draft_dir, bench_file, tmp_path):
    args = [
        "ckpt=" + str(draft_dir), "target=tiny_random", "bench=custom", f"bench.path={bench_file}", "bench.limit=1",
        "infer.budgets=[2]", "infer.depth=2", "infer.top_k=2", "infer.max_new_tokens=4", "infer.warmup=0",
        "infer.progress=false", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "DOVETAIL_CACHE": target_spec("tiny_random")["cache_dir"]}
    proc = subprocess.run(
        [sys.executable, "evaluate.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["bench"], r["budget"], r["n_prompts"]) for r in rows] == [("custom", 2, 1)]
    assert (tmp_path / "answers" / "custom_b2.jsonl").exists() and (tmp_path / "tau_vs_budget.png").exists()
    assert "speedup" in proc.stdout and "custom" in proc.stdout
