"""One-way dependencies: dovetail_infer runs without Lightning, Hydra or dovetail_train."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

FORBIDDEN = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "dovetail_train")


def test_importing_dovetail_infer_loads_no_training_stack():
    modules = [
        "dovetail_infer",
        "dovetail_infer.engine",
        "dovetail_infer.evaluate",
        "dovetail_infer.checkpoint",
        "dovetail_infer.models.target",
        "dovetail_infer.outdir",
        "dovetail_infer.serve",
    ]
    code = (
        f"import sys; import {', '.join(modules)}; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
