"""DistillModule: the training logic around a plain `DraftModel` (architecture lives in dovetail_infer)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from dovetail_infer.models.draft import DraftConfig, DraftModel
from dovetail_train.losses import distill_losses, shift_batch, simulated_tau, uniform_noise


class DistillModule(L.LightningModule):
    """Trains a draft to predict the target's next feature.

    The target's embedding and LM head are frozen, non-persistent buffers: they never enter a
    checkpoint. With `online=True` the target itself runs inside the step (no feature cache).
    """

    def __init__(
        self,
        draft_config: DraftConfig,
        embed_weight: torch.Tensor,
        head_weight: torch.Tensor,
        optim: dict[str, Any] | None = None,
        loss: dict[str, Any] | None = None,
        sim_tau_steps: int = 5,
        target_model: torch.nn.Module | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters({"draft": draft_config.to_dict(), "optim": optim, "loss": loss})
        self.draft = DraftModel(draft_config)
        self.register_buffer("embed_weight", embed_weight.detach().float(), persistent=False)
        tied = head_weight.data_ptr() == embed_weight.data_ptr()
        self.register_buffer("head_weight", None if tied else head_weight.detach().float(), persistent=False)
        self.optim = {"lr": 5e-4, "weight_decay": 0.0, "betas": (0.9, 0.95), "warmup_steps": 20, "min_lr_ratio": 0.1}
        self.optim.update(optim or {})
        self.loss_cfg = {"w_feat": 1.0, "w_tok": 0.1, "noise_std": 0.2}
        self.loss_cfg.update(loss or {})
        self.sim_tau_steps = sim_tau_steps
        self.seed = int(seed)
        self._target = [target_model] if target_model is not None else []  # a list: not a submodule

    @property
    def head(self) -> torch.Tensor:
        return self.embed_weight if self.head_weight is None else self.head_weight

    def on_fit_start(self) -> None:
        if self._target:
            self._target[0].to(self.device)

    def _features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "hidden" in batch:
            return batch["hidden"]
        with torch.no_grad():  # online: the target computes the features inside the step
            return self._target[0](batch["input_ids"])

    def _noise_generator(self, batch_idx: int) -> torch.Generator:
        """Noise seeded by (seed, epoch, batch, rank): a resumed run draws the same noise as an uninterrupted one."""
        key = ((self.seed * 1_000_003 + self.current_epoch) * 1_000_003 + batch_idx) * 1024 + self.global_rank
        return torch.Generator(device=self.device).manual_seed(key % 2**63)

    def _step(self, batch: dict[str, torch.Tensor], split: str, batch_idx: int = 0) -> dict[str, torch.Tensor]:
        dtype = self.embed_weight.dtype
        hidden = self._features(batch).to(dtype)
        feat_in, tok_in, feat_tgt, mask = shift_batch(batch["input_ids"], hidden, batch["loss_mask"])
        if split == "train":
            feat_in = uniform_noise(feat_in, self.loss_cfg["noise_std"], self._noise_generator(batch_idx))
        emb = torch.nn.functional.embedding(tok_in, self.embed_weight)
        pred = self.draft(feat_in, emb)
        out = distill_losses(pred, feat_tgt, mask, self.head, self.loss_cfg["w_feat"], self.loss_cfg["w_tok"])
        bs = batch["input_ids"].shape[0]
        for k in ("loss", "feat_loss", "tok_loss", "top1_acc"):
            self.log(
                f"{split}/{k}", out[k], prog_bar=k in ("loss", "top1_acc"), batch_size=bs, sync_dist=split != "train"
            )
        if split == "val" and self.sim_tau_steps > 0:
            tau = simulated_tau(self.draft, feat_in, emb, feat_tgt, mask, self.head, self.sim_tau_steps)
            self.log("val/sim_tau", tau, prog_bar=True, batch_size=bs, sync_dist=True)
        return out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", batch_idx)["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        o = self.optim
        decay = [p for n, p in self.draft.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.draft.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o["lr"],
            betas=tuple(o["betas"]),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = min(int(o["warmup_steps"]), max(total // 10, 1))
        floor = float(o["min_lr_ratio"])

        def schedule(step: int) -> float:  # linear warmup, cosine decay to floor * lr
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
