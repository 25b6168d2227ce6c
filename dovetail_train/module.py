"""DistillModule: the training logic around a plain `DraftModel` (architecture lives in dovetail_infer)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from dovetail_infer.checkpoint import frequent_token_ids
from dovetail_infer.engine import DRAFT_VOCAB
from dovetail_infer.models.draft import DraftConfig, DraftModel
from dovetail_train.losses import distill_losses, shift_batch, simulated_tau, uniform_noise

# The defaults of the training recipe; conf/train.yaml restates them for Hydra users, with DistillModule's own
# (sim_tau_steps, seed, compile): tests/test_defaults.py checks every value.
OPTIM_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "weight_decay": 0.0,
    "betas": (0.9, 0.95),
    "warmup_steps": 20,
    "min_lr_ratio": 0.1,
    "schedule": "cosine",  # after warmup: cosine or linear decay to min_lr_ratio * lr
    "total_steps": None,  # steps the decay spans; None = this run's length
}
LOSS_DEFAULTS: dict[str, Any] = {
    "w_feat": 1.0,
    "w_tok": 0.1,
    "noise_std": 0.2,
    "noise_by_length": False,
    "positions": "assistant",  # where training's loss counts: "assistant" tokens (the paper) or "all" real tokens
    "unroll": 1,
    "unroll_decay": 0.8,
    # inference's default draft vocabulary: the token loss over the rows the draft proposes from. Resolved from the
    # datamodule's token counts; without them the full vocabulary
    "draft_vocab": DRAFT_VOCAB,
}


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
        seed: int = 42,
        vocab_ids: torch.Tensor | None = None,
        compile: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters({"draft": draft_config.to_dict(), "optim": optim, "loss": loss})
        self.draft = DraftModel(draft_config)
        self.register_buffer("embed_weight", embed_weight.detach().float(), persistent=False)
        tied = head_weight.data_ptr() == embed_weight.data_ptr()
        self.register_buffer("head_weight", None if tied else head_weight.detach().float(), persistent=False)
        # the token loss over the draft vocabulary (the rows inference proposes from): a far smaller head per step.
        # `vocab_ids` gives the rows; loss.draft_vocab a size, resolved in setup() from the datamodule's token counts
        self.register_buffer("vocab_ids", None, persistent=False)
        self.register_buffer("loss_head", None, persistent=False)
        self.set_vocab(vocab_ids)
        self.optim = dict(OPTIM_DEFAULTS)
        self.optim.update(optim or {})
        self.loss_cfg = dict(LOSS_DEFAULTS)
        self.loss_cfg.update(loss or {})
        if self.loss_cfg["positions"] not in ("assistant", "all"):
            raise ValueError(f"loss.positions must be 'assistant' or 'all', got {self.loss_cfg['positions']!r}")
        if int(self.loss_cfg["unroll"]) < 1:
            raise ValueError(f"loss.unroll must be >= 1 (1 = no unrolling), got {self.loss_cfg['unroll']}")
        self.sim_tau_steps = sim_tau_steps
        self.seed = int(seed)
        self._target = [target_model] if target_model is not None else []  # a list: not a submodule
        # the draft's forward, compiled or not; kept outside the module tree so checkpoints name `draft.*` only.
        # dynamic shapes: one graph for every batch length (benchmarks/train_throughput.py measures the gain)
        self._draft_fn = [torch.compile(self.draft, dynamic=True) if compile else self.draft]
        self.last_val_step = -1  # the global step of the latest finished validation

    @property
    def head(self) -> torch.Tensor:
        return self.embed_weight if self.head_weight is None else self.head_weight

    def set_vocab(self, vocab_ids: torch.Tensor | None) -> None:
        """The target-token ids the token loss runs over (None: the full vocabulary)."""
        self.vocab_ids = None if vocab_ids is None else vocab_ids.to(self.head.device)
        self.loss_head = self.head if vocab_ids is None else self.head[self.vocab_ids].contiguous()

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        counts = getattr(dm, "token_counts", None)
        size = self.loss_cfg["draft_vocab"]
        if size and counts is not None:
            self.set_vocab(frequent_token_ids(counts, int(size)))

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

    def compute(self, batch: dict[str, torch.Tensor], split: str, batch_idx: int = 0) -> dict[str, torch.Tensor]:
        """The losses and metrics of one batch, without logging (`split` "train" adds noise and unrolling)."""
        dtype = self.embed_weight.dtype
        hidden = self._features(batch).to(dtype)
        c = self.loss_cfg
        # positions=all: training counts every real next token, prompts included; validation stays on replies
        counted = batch["valid_mask"] if split == "train" and c["positions"] == "all" else batch["loss_mask"]
        feat_in, tok_in, feat_tgt, mask = shift_batch(batch["input_ids"], hidden, counted)
        if split == "train":
            gen = self._noise_generator(batch_idx)
            feat_in = uniform_noise(feat_in, c["noise_std"], gen, scale_by_length=c["noise_by_length"])
        emb = torch.nn.functional.embedding(tok_in, self.embed_weight)
        full = self.head if split == "val" and self.vocab_ids is not None else None
        pred = self._draft_fn[0](feat_in, emb)
        out = distill_losses(pred, feat_tgt, mask, self.loss_head, c["w_feat"], c["w_tok"], self.vocab_ids, full)
        if split == "train" and int(c["unroll"]) > 1:
            out["loss"] = self._unrolled_loss(out["loss"], pred, feat_in, emb, feat_tgt, mask)
        self._check_finite(out, split)
        if split == "val" and self.sim_tau_steps > 0:
            out["sim_tau"] = simulated_tau(
                self._draft_fn[0], feat_in, emb, feat_tgt, mask, self.head, self.sim_tau_steps,
                self.loss_head, self.vocab_ids,
            )  # fmt: skip
        return out

    def _step(self, batch: dict[str, torch.Tensor], split: str, batch_idx: int = 0) -> dict[str, torch.Tensor]:
        out = self.compute(batch, split, batch_idx)
        bs = batch["input_ids"].shape[0]
        for k in ("loss", "feat_loss", "tok_loss", "top1_acc", "sim_tau"):
            if k in out:
                bar = k in ("loss", "top1_acc", "sim_tau")
                self.log(f"{split}/{k}", out[k], prog_bar=bar, batch_size=bs, sync_dist=split != "train")
        return out

    def _unrolled_loss(self, loss0, pred, feat_in, emb, feat_tgt, mask) -> torch.Tensor:
        """Training-time test: step s feeds the draft its own step s-1 predictions (shifted one position: the
        feature a tree node at depth s reads at inference) and asks for the same next feature. Step s is weighted
        by unroll_decay**s; the total is normalised to the weight of step 0."""
        c = self.loss_cfg
        total, weights = loss0, 1.0
        for s in range(1, int(c["unroll"])):
            feats = torch.cat([feat_in[:, :1], pred[:, :-1]], dim=1)
            pred = self._draft_fn[0](feats, emb)
            m = mask.clone()
            m[:, :s] = 0  # the chain from position i - s starts inside the sequence
            step = distill_losses(pred, feat_tgt, m, self.loss_head, c["w_feat"], c["w_tok"])["loss"]
            w = float(c["unroll_decay"]) ** s
            total, weights = total + w * step, weights + w
        return total / weights

    def _check_finite(self, out: dict[str, torch.Tensor], split: str) -> None:
        """Stop at the first non-finite loss, naming the step and the part: a NaN draft must never be exported."""
        if bool(torch.isfinite(out["loss"])):
            return
        c = self.loss_cfg
        parts = {"w_feat * feat_loss": c["w_feat"] * out["feat_loss"], "w_tok * tok_loss": c["w_tok"] * out["tok_loss"]}
        bad = {k: float(v) for k, v in parts.items() if not bool(torch.isfinite(v))} or {"loss": float(out["loss"])}
        raise FloatingPointError(
            f"non-finite {split} loss at global step {self.global_step} (epoch {self.current_epoch}): {bad} "
            f"(w_feat={c['w_feat']}, w_tok={c['w_tok']}, optim.lr={self.optim['lr']}); no draft is exported. "
            "Lower optim.lr, check the loss weights, or rebuild the feature cache"
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", batch_idx)["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.last_val_step = self.global_step

    def _total_steps(self) -> int:
        """Optimizer steps of the whole run, without building the train loader.

        Lightning's `estimated_stepping_batches` builds the loader inside `configure_optimizers`, before a resumed
        run restores the loader's position, and the loader built then is the one that trains: an epoch-based run
        resumed mid-epoch would retrain the epoch's first batches. The datamodule knows its batch count instead.
        """
        t = self.trainer
        dm = t.datamodule
        if t.max_epochs in (None, -1) or dm is None or not hasattr(dm, "train_batches"):
            return max(1, int(min(t.estimated_stepping_batches, 2**31)))
        per_epoch = dm.train_batches(t.world_size)
        limit = t.limit_train_batches
        if isinstance(limit, int):
            per_epoch = min(per_epoch, limit)
        elif limit is not None:
            per_epoch = int(per_epoch * float(limit))
        total = math.ceil(per_epoch / t.accumulate_grad_batches) * max(t.max_epochs, 1)
        return max(1, min(total, t.max_steps) if t.max_steps != -1 else total)

    def _timer(self):
        """Lightning's Timer when `trainer.max_time` is set (its elapsed time survives a resume), else None."""
        from lightning.pytorch.callbacks import Timer

        timers = [c for c in self.trainer.callbacks if isinstance(c, Timer) and c.time_remaining() is not None]
        return timers[0] if timers else None

    def configure_optimizers(self):
        o = self.optim
        decay = [p for n, p in self.draft.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.draft.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o["lr"],
            betas=tuple(o["betas"]),
        )
        if o["schedule"] not in ("cosine", "linear"):
            raise ValueError(f"optim.schedule must be 'cosine' or 'linear', got {o['schedule']!r}")
        total = int(o["total_steps"]) if o["total_steps"] else self._total_steps()
        warm = min(int(o["warmup_steps"]), max(total // 10, 1))
        floor = float(o["min_lr_ratio"])
        timer = None if o["total_steps"] else self._timer()
        linear = o["schedule"] == "linear"

        def schedule(step: int) -> float:  # linear warmup, then cosine or linear decay to floor * lr
            if step < warm:
                return (step + 1) / warm
            progress = (step - warm) / max(1, total - warm)
            if timer is not None:  # a time-limited run decays by whichever runs out first: steps or time
                elapsed = timer.time_elapsed("train")
                progress = max(progress, elapsed / (elapsed + timer.time_remaining("train")))
            progress = min(1.0, progress)
            left = 1 - progress if linear else 0.5 * (1 + math.cos(math.pi * progress))
            return floor + (1 - floor) * left

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
