"""Packaging hook (the metadata is in pyproject.toml): a wheel carries the Hydra configs, the shipped draft and the
bundled data inside `dovetail_cli/`, so the console scripts work outside a clone (`dovetail_cli.asset_root`)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
ASSETS = ["conf", "drafts", "data/README.md", "data/bench", "data/prompts", "data/sharegpt"]


class BuildPyWithAssets(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads them from the clone
            return
        dest = Path(self.build_lib) / "dovetail_cli"
        for rel in ASSETS:
            src = ROOT / rel
            if src.is_dir():
                shutil.copytree(src, dest / rel, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            elif src.is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)


setup(cmdclass={"build_py": BuildPyWithAssets})
