"""Console entry points (`dovetail-train`, `dovetail-eval`, `dovetail-chat`, `dovetail-serve`): the top-level scripts'
Hydra apps, with the config dir found wherever Dovetail is installed.

In a clone (or an editable install) the configs are the clone's `conf/`; a wheel carries them as `dovetail_cli/conf`,
with the shipped draft and the bundled data beside them (`dovetail_cli/drafts`, `dovetail_cli/data`). Run outside a
clone, the commands default `ckpt` and `paths.data_dir` to those packaged copies unless the command line sets them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHIPPED_DRAFT = "drafts/smollm2-135m-dovetail"


def asset_root() -> Path:
    """Where conf/, drafts/ and data/ are: inside the installed package (a wheel), else the clone."""
    return HERE if (HERE / "conf" / "train.yaml").is_file() else HERE.parent


def config_dir() -> str:
    return str(asset_root() / "conf")


def _default_overrides(argv: list[str], uses_ckpt: bool) -> list[str]:
    """Overrides pointing at the packaged draft and data when the working directory is not a clone."""
    given = {a.split("=", 1)[0].lstrip("+~") for a in argv if "=" in a}
    if "paths.root_dir" in given or os.environ.get("PROJECT_ROOT") or Path(SHIPPED_DRAFT).exists():
        return []  # a clone, or the user chose the root
    root, extra = asset_root(), []
    if uses_ckpt and "ckpt" not in given and (root / SHIPPED_DRAFT).is_dir():
        extra.append(f"ckpt={root / SHIPPED_DRAFT}")
    if "paths.data_dir" not in given and (root / "data").is_dir():
        extra.append(f"paths.data_dir={root / 'data'}")
    return extra


def _run(config_name: str, task: Callable[[Any], Any], uses_ckpt: bool) -> Any:
    import hydra

    sys.argv[1:1] = _default_overrides(sys.argv[1:], uses_ckpt)  # before any flag: argparse takes overrides first
    main = hydra.main(config_path=config_dir(), config_name=config_name, version_base="1.3")(task)
    return main()


def _train(cfg: Any) -> Any:
    from dovetail_train.cli import run_train

    return run_train(cfg)


def _evaluate(cfg: Any) -> Any:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from dovetail_infer.evaluate import evaluate, evaluate_sweep

    plain = OmegaConf.to_container(cfg, resolve=True)
    output_dir = HydraConfig.get().runtime.output_dir
    rows = evaluate_sweep(plain, output_dir) if plain.get("sweep") else evaluate(plain, output_dir)
    speedups = [r["speedup"] for r in rows if r.get("speedup") is not None]
    return sum(speedups) / len(speedups) if speedups else None


def _chat(cfg: Any) -> None:
    from omegaconf import OmegaConf

    from dovetail_infer.chat import run_chat

    run_chat(OmegaConf.to_container(cfg, resolve=True))


def _serve(cfg: Any) -> None:
    from omegaconf import OmegaConf

    from dovetail_infer.serve import run_server

    run_server(OmegaConf.to_container(cfg, resolve=True))


def train() -> Any:
    """`dovetail-train ...` = `python train.py ...`."""
    return _run("train", _train, uses_ckpt=False)


def evaluate() -> Any:
    """`dovetail-eval ...` = `python evaluate.py ...`."""
    return _run("evaluate", _evaluate, uses_ckpt=True)


def chat() -> None:
    """`dovetail-chat ...` = `python chat.py ...`."""
    _run("chat", _chat, uses_ckpt=True)


def serve() -> None:
    """`dovetail-serve ...` = `python serve.py ...`."""
    _run("serve", _serve, uses_ckpt=True)
