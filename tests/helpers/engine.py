"""Shared engine-test helpers: prompts, HF greedy references, random and "cheating" drafts, KV-cache spies."""

from __future__ import annotations

import torch

from dovetail_infer.kv_cache import KVCache
from dovetail_infer.models.draft import DraftConfig, DraftModel
from dovetail_infer.models.target import Target

CHATS = ["Hi there!", "Write a haiku about the sea.", "What is 17 * 3?"]
_REF: dict = {}


def prompt(target: Target, i: int) -> list[int]:
    return target.apply_chat_template([{"role": "user", "content": CHATS[i]}])


@torch.no_grad()
def hf_greedy(target: Target, ids: list[int], n: int) -> list[int]:
    """HF generate's new tokens (EOS included when produced), cached per target/prompt/length."""
    key = (id(target), tuple(ids), n)
    if key not in _REF:
        x = torch.tensor([ids])
        out = target.hf_model().generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)
        _REF[key] = out[0, len(ids) :].tolist()
    return _REF[key]


def random_draft(target: Target, depth: int = 1, seed: int = 0) -> DraftModel:
    torch.manual_seed(seed)
    return DraftModel(DraftConfig.from_target(target.config, depth=depth)).to(target.dtype)


class CheatDraft(DraftModel):
    """Knows the target's greedy continuation: predicts the target's true feature of the next position
    (plus a little noise, so the right token is sometimes 2nd-4th and the accepted path branches),
    scaled up so the draft is confident and the trees grow deep."""

    def __init__(self, target: Target, ids: list[int], noise: float = 0.2, seed: int = 0, scale: float = 10.0) -> None:
        super().__init__(DraftConfig.from_target(target.config, depth=1))
        feats = target.model(torch.tensor([ids]))[0].float()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("feats", scale * (feats + noise * torch.randn(feats.shape, generator=gen)))
        self.to(target.dtype)

    def forward(self, feat, emb, positions=None, mask=None, cache=None, start=0):
        if positions is None:
            positions = torch.arange(start, start + feat.shape[1])[None]
        return self.feats[(positions + 1).clamp(max=len(self.feats) - 1)].to(feat.dtype)


def compactions(monkeypatch) -> list[int]:
    """Counts KVCache.commit calls that really move entries (the accepted path is not contiguous)."""
    moved, commit = [], KVCache.commit

    def spy(self, slots, start=None):
        s = list(slots)
        moved.append(int(s != list(range(s[0], s[0] + len(s))) if s else 0))
        return commit(self, slots, start)

    monkeypatch.setattr(KVCache, "commit", spy)
    return moved


def near_tie(target: Target, ids: list[int], a: int, b: int) -> bool:
    """Tokens a and b get bf16 logits within 2 bf16 steps of each other after `ids` (one forward, no cache)."""
    with torch.no_grad():
        logits = target.model.logits(target.model(torch.tensor([ids])))[0, -1].float()
    step = 2.0 ** (torch.floor(torch.log2(logits.abs().max())) - 7)  # bf16 spacing at the top logit
    return bool(abs(logits[a] - logits[b]) <= 2 * step)
