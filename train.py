"""Distil a Dovetail draft: `python train.py draft.depth=4`, sweeps with `python train.py -m ...`."""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from dovetail_train.cli import run_train

    return run_train(cfg)


if __name__ == "__main__":
    main()
