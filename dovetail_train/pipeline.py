"""train(cfg) -> (metrics, objects): build everything from the config in one place, fit, export."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dovetail_infer.checkpoint import DraftMismatchError, load_draft, save_draft
from dovetail_infer.models.draft import DraftConfig
from dovetail_infer.models.target import load_target
from dovetail_infer.outdir import check_output_dir
from dovetail_train.data.datamodule import DistillDataModule, check_data_config
from dovetail_train.module import DistillModule

log = logging.getLogger(__name__)


def _instantiate_all(node: DictConfig | None) -> list[Any]:
    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def resolve_ckpt_path(ckpt_path: str | None, out_dir: Path) -> str | None:
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        last = out_dir / "checkpoints" / "last.ckpt"
        if not last.exists():
            raise FileNotFoundError(
                f"ckpt_path=last but {last} does not exist; resume inside the old run dir with hydra.run.dir=<run dir>"
            )
        return str(last)
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
    return ckpt_path


def check_fresh_run_dir(out_dir: Path, ckpt_path: str | None) -> None:
    """A run dir that holds another run's checkpoints or draft is only reused to resume it: a second run there would
    replace its draft and mix the two runs' checkpoints (`last.ckpt` vs `last-v1.ckpt`)."""
    if ckpt_path not in (None, "", "null"):
        return
    old = sorted(p.name for p in (out_dir / "checkpoints").glob("*.ckpt")) if (out_dir / "checkpoints").is_dir() else []
    if old or (out_dir / "draft" / "model.safetensors").exists():
        raise FileExistsError(
            f"{out_dir} already holds a training run ({', '.join(old[:3]) or 'draft/'}): resume it with "
            f"ckpt_path=last hydra.run.dir={out_dir}, or train into a fresh dir (omit hydra.run.dir for a new "
            "timestamped one)"
        )


def init_draft_weights(module: DistillModule, draft_dir: str | Path, target_identity: dict[str, Any]) -> None:
    """Start from an exported draft's weights (fine-tuning, or a warm restart with a new LR schedule).

    Unlike `ckpt_path`, nothing else carries over: optimizer, schedule and step count start fresh. The draft
    must be made for this target and have this run's draft config (depth, fusion, sizes)."""
    loaded, _ = load_draft(draft_dir, target_identity)
    want, have = module.draft.config.to_dict(), loaded.config.to_dict()
    diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
    if diff:
        raise DraftMismatchError(
            f"init_from={draft_dir}: its config differs from this run's draft config "
            + ", ".join(f"{k}: {a!r} there vs {b!r} here" for k, (a, b) in diff.items())
            + " (pick the matching draft=... or draft.* overrides)"
        )
    module.draft.load_state_dict({k: v.float() for k, v in loaded.state_dict().items()})
    log.info("initialised the draft from %s", draft_dir)


def init_layers_from_target(draft: torch.nn.Module, target_model: torch.nn.Module) -> None:
    """Start the draft's decoder layers from the target's last ones (the fusion stays random).

    The draft's layer i gets the target's layer n_layers - depth + i; the first draft layer has no input norm,
    so that one weight is skipped. A prior for attention and MLP weights that already read this feature space."""
    depth, n = len(draft.layers), len(target_model.layers)
    if depth > n:
        raise ValueError(f"init_layers=target: the draft has {depth} layers, the target only {n}")
    for i, layer in enumerate(draft.layers):
        src = target_model.layers[n - depth + i].state_dict()
        own = layer.state_dict()
        layer.load_state_dict({k: src[k].float().clone() for k in own}, strict=True)
    log.info("initialised the draft's %d layer(s) from the target's last layers", depth)


def check_init_config(init_from: str | None, init_layers: str | None) -> None:
    """`init_layers` is null or `target`, and not given together with `init_from` (one start, not two)."""
    if init_layers not in (None, "target"):
        raise ValueError(f"init_layers must be null or 'target', got {init_layers!r}")
    if init_layers and init_from:
        raise ValueError(f"init_from={init_from} and init_layers={init_layers} both set: pick one start for the draft")


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    out_dir = check_output_dir(cfg.paths.output_dir)
    check_fresh_run_dir(out_dir, cfg.get("ckpt_path"))
    check_init_config(cfg.get("init_from"), cfg.get("init_layers"))
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    check_data_config(data_cfg)  # bad data settings fail before the target loads (minutes for a 7B)
    draft_overrides = OmegaConf.to_container(cfg.draft, resolve=True)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(int(cfg.get("num_threads") or os.cpu_count() or 1))
    t0 = time.time()
    target = load_target(OmegaConf.to_container(cfg.target, resolve=True))
    draft_cfg = DraftConfig.from_target(target.config, **draft_overrides)
    datamodule = DistillDataModule(target=target, seed=cfg.seed, **data_cfg)
    online = cfg.data.features == "online"
    module = DistillModule(
        draft_cfg,
        embed_weight=target.embed.weight,
        head_weight=target.lm_head.weight,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        loss=OmegaConf.to_container(cfg.loss, resolve=True),
        sim_tau_steps=cfg.sim_tau_steps,
        target_model=target.model if online else None,
        seed=cfg.seed,
        compile=bool(cfg.get("compile", False)),
    )
    if cfg.get("init_from"):
        init_draft_weights(module, cfg.init_from, target.identity())
    elif cfg.get("init_layers"):
        init_layers_from_target(module.draft, target.model)
    n_params = module.draft.num_trainable()
    log.info(
        "draft: depth %d, fusion %s, %.2fM trainable parameters", draft_cfg.depth, draft_cfg.fusion, n_params / 1e6
    )
    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    ckpt = resolve_ckpt_path(cfg.get("ckpt_path"), out_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    if not trainer.fast_dev_run and trainer.limit_val_batches != 0 and module.last_val_step != trainer.global_step:
        # stopped by time or steps after the last validation: the printed metrics describe the exported weights
        trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    train_s = time.time() - t0
    draft_dir = None
    if trainer.is_global_zero:
        summary = {
            "metrics": metrics,
            "global_step": trainer.global_step,
            "epochs": trainer.current_epoch,
            "train_seconds": round(train_s, 1),
            "trainable_params": n_params,
            "data": datamodule.summary,
            "config": OmegaConf.to_container(cfg, resolve=False),
        }
        draft_dir = save_draft(
            module.draft, out_dir / "draft", target.identity(), summary, token_counts=datamodule.token_counts
        )
        log.info("exported draft to %s", draft_dir)
    metrics["trainable_params"] = n_params
    objects = {"target": target, "module": module, "trainer": trainer, "datamodule": datamodule, "draft_dir": draft_dir}
    return metrics, objects
