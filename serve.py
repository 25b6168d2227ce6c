"""An OpenAI-compatible server for a target and a draft: python serve.py [server.port=8000] [ckpt=DRAFT_DIR]."""

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(config_path="conf", config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from dovetail_infer.serve import run_server

    run_server(OmegaConf.to_container(cfg, resolve=True))


if __name__ == "__main__":
    main()
