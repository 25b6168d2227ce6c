"""notebooks/ablation.ipynb runs end to end (nbclient, the venv's python3 kernel) on a tiny evaluated sweep."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import torch
from conftest import ROOT, target_spec
from nbclient import NotebookClient

from dovetail_infer.checkpoint import save_draft
from dovetail_infer.evaluate import evaluate_sweep
from dovetail_infer.models.draft import DraftConfig, DraftModel

pytestmark = pytest.mark.slow  # evaluates a sweep, then runs the notebook in a kernel

NOTEBOOK = ROOT / "notebooks" / "ablation.ipynb"
PNGS = [
    "ablation_tau_vs_depth.png",
    "ablation_tokens_per_s_vs_budget.png",
    "ablation_accept_by_position.png",
    "ablation_sim_tau_vs_tau.png",
]


@pytest.fixture(scope="module")
def sweep_table(tiny_target, tmp_path_factory) -> Path:
    """Two random drafts (depth 1 and 2, DGF) exported like a training sweep, then evaluated as one."""
    root = tmp_path_factory.mktemp("nb")
    torch.manual_seed(0)
    for job, depth in enumerate((1, 2)):
        draft = DraftModel(DraftConfig.from_target(tiny_target.config, depth=depth, fusion="dgf"))
        summary = {
            "metrics": {"val/sim_tau": 1.0 + 0.1 * depth},
            "train_seconds": 1.0,
            "global_step": 1,
            "config": {"draft": {"depth": depth}},
        }
        save_draft(draft, root / "sweep" / str(job) / "draft", tiny_target.identity(), summary)
    bench = root / "q.jsonl"
    bench.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["Who wrote Hamlet?"]}) + "\n")
    cfg = {
        "sweep": str(root / "sweep"),
        "seed": 0,
        "target": target_spec("tiny_random"),
        "infer": {"budgets": [2, 4], "depth": 2, "top_k": 2, "max_new_tokens": 4, "warmup": 0, "progress": False},
        "bench": {"name": "custom", "path": str(bench), "limit": None},
    }
    rows = evaluate_sweep(cfg, root / "eval")
    assert [(r["run"], r["budget"], r["sim_tau"], r["draft.depth"]) for r in rows] == [
        ("0", 2, 1.1, 1),
        ("0", 4, 1.1, 1),
        ("1", 2, 1.2, 2),
        ("1", 4, 1.2, 2),
    ]
    return root / "eval" / "sweep_summary.json"


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_ablation_notebook_draws_the_plots(sweep_table, suffix, monkeypatch):
    table = sweep_table.with_suffix(suffix)
    for png in PNGS:
        (table.parent / png).unlink(missing_ok=True)
    monkeypatch.setenv("DOVETAIL_SWEEP_TABLE", str(table))  # the kernel inherits this process's environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    for png in PNGS:
        assert (table.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert str(table) in "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    lines = (table.parent / "ablation_table.md").read_text().splitlines()
    assert lines[0].startswith("| depth | fusion | params (M)") and "τ b2" in lines[0] and "τ b4" in lines[0]
    assert [row.split(" | ")[0] for row in lines[2:]] == ["| 1", "| 2"]  # one row per run, by depth
