"""Real speculative decoding while training: `val/tau` from the draft and the target, not a proxy."""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import lightning as L
import torch

from dovetail_infer.engine import Dovetail, InferConfig

log = logging.getLogger(__name__)


class SpeculativeValidation(L.Callback):
    """At each validation, decode a few held-out prompts speculatively (greedy) with the real target.

    Logs `val/tau` (tokens per target forward, the evaluated τ) and `val/accept_d{k}` (the share of forwards
    that accepted at least k draft tokens), plus `val/tau_seconds`. The prompts come from the validation split
    (`DistillDataModule.heldout_prompts`): never trained on, never from the bench sets. The tree shape defaults
    to the paper's (15 draft tokens, 8 levels, top-k 10, full vocabulary). The callback takes the target and
    the prompts from the datamodule in `setup` (or call `bind`); an unbound callback logs nothing.
    """

    def __init__(
        self,
        num_prompts: int = 4,
        max_new_tokens: int = 64,
        budget: int = 15,
        depth: int = 8,
        top_k: int = 10,
        draft_vocab: int | None = None,
        max_prompt_tokens: int = 768,
    ) -> None:
        if num_prompts < 0 or max_new_tokens < 1:
            raise ValueError(f"num_prompts must be >= 0 and max_new_tokens >= 1, got {num_prompts}, {max_new_tokens}")
        self.num_prompts, self.max_prompt_tokens = int(num_prompts), int(max_prompt_tokens)
        # no early stop (min_prob 0): the paper's tree is grown to its full budget
        self.cfg = InferConfig(max_new_tokens=max_new_tokens, budget=budget, depth=depth, top_k=top_k, min_prob=0.0)
        self.draft_vocab = draft_vocab
        self.target: Any = None
        self.prompts: list[list[int]] = []
        self.token_counts: torch.Tensor | None = None
        self.seconds = 0.0

    def bind(self, target: Any, prompts: list[list[int]], token_counts: torch.Tensor | None = None) -> None:
        self.target = target
        room = int(target.config.max_position_embeddings) - self.cfg.max_new_tokens - self.cfg.budget - 1
        limit = min(self.max_prompt_tokens, room)  # prompts that leave room for the reply and the tree
        self.prompts = [p for p in prompts if 0 < len(p) <= limit][: self.num_prompts]
        self.token_counts = token_counts
        if not self.prompts and self.num_prompts:
            log.warning(
                "SpeculativeValidation: no held-out prompt of <= %d tokens: val/tau is off", self.max_prompt_tokens
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if self.target is None and self.num_prompts and dm is not None and hasattr(dm, "heldout_prompts"):
            self.bind(dm.target, dm.heldout_prompts(4 * self.num_prompts), dm.token_counts)

    @torch.no_grad()
    def measure(self, draft: torch.nn.Module) -> dict[str, float]:
        """τ and acceptance per depth of `draft` (left untouched: the engine gets a bf16 copy)."""
        copy_ = copy.deepcopy(draft).to(dtype=self.target.dtype)
        vocab = self.draft_vocab if self.token_counts is not None else None
        engine = Dovetail(self.target, copy_, "cpu", draft_vocab=vocab, token_counts=self.token_counts)
        new = forwards = 0
        reached = [0] * self.cfg.depth
        for prompt in self.prompts:
            r = engine.generate(prompt, self.cfg)
            new, forwards = new + r.new_tokens - 1, forwards + r.forwards
            reached = [a + b for a, b in zip(reached, r.accepted_per_depth)]
        out = {"val/tau": new / forwards if forwards else 1.0}  # tokens per forward, the bonus token included
        out.update({f"val/accept_d{d + 1}": reached[d] / max(forwards, 1) for d in range(min(4, self.cfg.depth))})
        return out

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.target is None or not self.prompts or trainer.sanity_checking:
            return
        t0 = time.perf_counter()
        was_training = pl_module.draft.training
        metrics = self.measure(pl_module.draft)
        pl_module.draft.train(was_training)
        self.seconds += time.perf_counter() - t0
        for k, v in metrics.items():
            pl_module.log(k, v, prog_bar=k == "val/tau", sync_dist=True)
        pl_module.log("val/tau_seconds", self.seconds, sync_dist=True)
