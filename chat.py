"""Chat with the target through the draft: python chat.py [prompt="..."] [ckpt=DRAFT_DIR] [infer.temperature=0.7]."""

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(config_path="conf", config_name="chat", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from dovetail_infer.chat import run_chat

    run_chat(OmegaConf.to_container(cfg, resolve=True))


if __name__ == "__main__":
    main()
