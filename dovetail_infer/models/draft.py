"""The Dovetail draft: fusion of (feature f_i, embedding of t_{i+1}) followed by N Llama decoder layers.

It predicts f_{i+1}, the target's final-norm hidden state. The target's embedding and LM head are
frozen and reused: they are passed in, never stored in the draft or its checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from dovetail_infer.models.fusion import FUSIONS
from dovetail_infer.models.llama import Block, LlamaConfig, rope_inv_freq, run_blocks


@dataclass
class DraftConfig:
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    depth: int = 1
    fusion: str = "dgf"
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "n_heads", "n_kv_heads", "vocab_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"draft {name} must be a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"draft n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"draft depth must be an integer >= 1, got {self.depth!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"draft fusion must be one of {sorted(FUSIONS)}, got {self.fusion!r}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.n_heads

    @classmethod
    def from_target(cls, target: LlamaConfig, **overrides: Any) -> DraftConfig:
        """Sizes default to the target's; `overrides` with value None are ignored."""
        base = {f.name: getattr(target, f.name) for f in fields(cls) if hasattr(target, f.name)}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DraftConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown DraftConfig keys {sorted(unknown)}; expected a subset of {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def layer_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            n_layers=self.depth,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            intermediate_size=self.intermediate_size,
            head_dim=self.head_dim,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
        )


class DraftModel(nn.Module):
    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.config = cfg
        lc = cfg.layer_config()
        self.fusion = FUSIONS[cfg.fusion](cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(Block(lc, input_norm=i > 0) for i in range(cfg.depth))
        self.register_buffer("inv_freq", rope_inv_freq(lc), persistent=False)

    def forward(
        self,
        feat: torch.Tensor,
        emb: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache=None,
        start: int = 0,
    ) -> torch.Tensor:
        """feat (B, T, D) features f_i; emb (B, T, D) embeddings of t_{i+1}. Returns predicted f_{i+1}.

        Masks, positions and the cache follow `LlamaModel.forward`. Attention sums by cache slot (`exact=False`):
        the draft only proposes, so it skips the position-order split the target needs for exact verification.
        """
        x = self.fusion(feat, emb)
        return run_blocks(self.layers, x, self.inv_freq, positions, mask, cache, start, exact=False)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
