"""Console entry points and packaging: `dovetail-*` commands, and a wheel that carries the configs and assets."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

import dovetail_cli

COMMANDS = {"dovetail-train": "train", "dovetail-eval": "evaluate", "dovetail-chat": "chat", "dovetail-serve": "serve"}


def test_console_scripts_are_declared_and_find_their_configs():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {name: f"dovetail_cli:{fn}" for name, fn in COMMANDS.items()}
    for fn in COMMANDS.values():
        assert callable(getattr(dovetail_cli, fn))
    for config in ("train", "evaluate", "chat", "serve"):
        assert (Path(dovetail_cli.config_dir()) / f"{config}.yaml").is_file()


def test_outside_a_clone_the_packaged_draft_and_data_are_the_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("PROJECT_ROOT", raising=False)
    monkeypatch.chdir(ROOT)
    assert dovetail_cli._default_overrides([], uses_ckpt=True) == []  # in the clone: the clone's own paths
    monkeypatch.chdir(tmp_path)
    root = dovetail_cli.asset_root()
    assert dovetail_cli._default_overrides(["max_tokens=4"], uses_ckpt=True) == [
        f"ckpt={root / dovetail_cli.SHIPPED_DRAFT}",
        f"paths.data_dir={root / 'data'}",
    ]
    assert dovetail_cli._default_overrides(["ckpt=null"], uses_ckpt=True) == [f"paths.data_dir={root / 'data'}"]
    assert dovetail_cli._default_overrides([f"paths.root_dir={ROOT}"], uses_ckpt=True) == []


@pytest.mark.slow
def test_dovetail_chat_runs_outside_the_clone(tmp_path):
    exe = Path(sys.executable).parent / "dovetail-chat"
    if not exe.exists():
        pytest.skip("console scripts not installed: pip install -e .")
    args = ["target=tiny_random", "ckpt=null", "prompt=Hi", "max_tokens=4", f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run([str(exe), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() and "4 tokens" in out.stderr


@pytest.mark.slow
def test_the_wheel_carries_configs_draft_and_data_but_no_cache(tmp_path):
    pytest.importorskip("setuptools")  # pip wheel --no-build-isolation builds with the installed setuptools
    src = tmp_path / "src"
    for rel in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    skip = shutil.ignore_patterns("__pycache__", "cache")
    for rel in ("dovetail_infer", "dovetail_train", "dovetail_cli", "conf", "drafts", "data"):
        shutil.copytree(ROOT / rel, src / rel, ignore=skip)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        str(src),
        "-w",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("dovetail-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for need in (
        "dovetail_cli/conf/serve.yaml",
        "dovetail_cli/conf/target/smollm2_135m.yaml",
        "dovetail_cli/drafts/smollm2-135m-dovetail/model.safetensors",
        "dovetail_cli/data/bench/gsm8k/question.jsonl",
        "dovetail_cli/data/sharegpt/sharegpt_smollm2_replies.jsonl",
        "dovetail_infer/serve.py",
    ):
        assert need in names, need
    assert not any("/cache/" in n for n in names)
