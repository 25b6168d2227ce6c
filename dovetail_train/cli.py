"""What train.py does after Hydra composed the config: run, report, return the optimized metric."""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from dovetail_train.pipeline import train

log = logging.getLogger(__name__)


def run_train(cfg: DictConfig) -> float | None:
    metrics, objects = train(cfg)
    draft_dir = objects["draft_dir"]
    if draft_dir is None:  # a non-zero DDP rank
        return None
    shown = {k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith("val/")}
    print(f"exported draft: {draft_dir}")
    print("val metrics: " + json.dumps(shown))
    value = metrics.get(cfg.get("optimized_metric") or "", None)
    return value
