"""Evaluate an exported draft: python evaluate.py ckpt=DRAFT_DIR bench=humaneval "infer.budgets=[4,8,16]"."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from dovetail_infer.evaluate import evaluate, evaluate_sweep

    plain = OmegaConf.to_container(cfg, resolve=True)
    output_dir = HydraConfig.get().runtime.output_dir
    rows = evaluate_sweep(plain, output_dir) if plain.get("sweep") else evaluate(plain, output_dir)
    speedups = [r["speedup"] for r in rows if r.get("speedup") is not None]
    return sum(speedups) / len(speedups) if speedups else None  # the metric a sweeper optimises


if __name__ == "__main__":
    main()
