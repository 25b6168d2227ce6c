"""Running `python train.py` on the tiny random target, and reading its CSV metrics."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

# the tiny random target, eager (compiling costs more than it saves on a tiny draft; test_fast_dev_run compiles)
TINY = ["target=tiny_random", "data.regen_batch_size=16", "compile=false"]


def run_train(*overrides: str, multirun: bool = False, check: bool = True, timeout: int = 600):
    """`python train.py` on the tiny target; the embedded prompts (`data=default`) unless the overrides pick data."""
    data = [] if any(o.startswith(("data=", "experiment=")) for o in overrides) else ["data=default"]
    keys = {o.split("=", 1)[0] for o in overrides}
    tiny = [o for o in TINY if o.split("=", 1)[0] not in keys]  # an explicit override replaces the tiny default
    cmd = [sys.executable, "train.py", *(["-m"] if multirun else []), *tiny, *data, *overrides]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    """All rows of all CSV logger versions of a run dir (a resumed run writes a new version)."""
    rows = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows
