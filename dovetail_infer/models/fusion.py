"""How the draft fuses the target's feature with the next token's embedding.

DGF (Dovetail's Dynamic Gating Fusion), no biases:
    e = RMSNorm(emb), h1 = f W1, h2 = SiLU(e W2), z = sigmoid([h1; h2] Wz), x = z*h1 + (1-z)*h2
Concat (EAGLE-1): x = Linear([emb; f]) with a bias.
"""

from __future__ import annotations

import torch
from torch import nn

from dovetail_infer.models.llama import RMSNorm


class DGFusion(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.emb_norm = RMSNorm(dim, eps)
        self.w1 = nn.Linear(dim, dim, bias=False)
        self.w2 = nn.Linear(dim, dim, bias=False)
        self.wz = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, feat: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h1 = self.w1(feat)
        h2 = nn.functional.silu(self.w2(self.emb_norm(emb)))
        z = torch.sigmoid(self.wz(torch.cat([h1, h2], dim=-1)))
        return z * h1 + (1 - z) * h2


class ConcatFusion(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * dim, dim, bias=True)

    def forward(self, feat: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([emb, feat], dim=-1))


FUSIONS = {"dgf": DGFusion, "concat": ConcatFusion}
