"""Exact attention for a few new queries over a long KV cache: verification equals one-token decoding.

Speculative decoding is lossless only if a token verified among others gets bitwise the logits it gets when
decoded alone. SDPA's reductions depend on the query count and the cache length, so decoding and verification
(up to `SMALL_QUERY` new tokens over a cache) attend through `split_attention`: the last `TAIL` keys of each
query summed in position order, everything before them in fixed `BLOCK`-slot GEMMs. docs/exactness.md says why.

Shapes: B batch, H heads, T new tokens, S cache slots, d head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from dovetail_infer.kv_cache import round_up

SMALL_QUERY = 32  # up to this many new tokens (with a cache), attention runs as two matmuls, not SDPA (see below)
TAIL = SMALL_QUERY  # a query at position p sums the keys of positions p-TAIL+1..p apart, in position order
BLOCK = 64  # the keys before the tail are weighted in GEMMs of exactly this many cache slots (see block_weighted_sum)


class SplitMask(NamedTuple):
    """Where a few new queries find their keys (see `split_attention`); built once per forward by `split_mask`.

    tail (B|1, 1, 1, T, W) long: the slots holding positions p-W+1..p of query t (p its position), in order;
    tail_bias (B|1, 1, 1, T, W) float: -inf where that position does not exist or the query may not see it, else 0;
    shared_bias (B|1, 1, 1, T, S) float: -inf at slots not summed in place (the tail's, the masked ones), else 0.
    tail None: one token decoded after at least W-1 others; it attends to the first `length` slots and its tail
    is the last W of them.
    """

    tail: torch.Tensor | None = None
    tail_bias: torch.Tensor | None = None
    shared_bias: torch.Tensor | None = None
    length: int = 0


def split_mask(
    positions: torch.Tensor | None, mask: torch.Tensor | None, start: int | torch.Tensor, T: int, width: int = TAIL
) -> SplitMask:
    """positions (B, T) and a boolean mask (B|1, 1, T, S) over cache slots (True = may attend) -> a `SplitMask`.

    Slots before `start` hold their own positions (the committed prefix). A new token's slot holds its
    position; a query's tail takes, for each position past `start`, the visible new slot at that position
    (in a tree: the ancestor at that depth). Every visible slot is summed exactly once, in the tail or in
    place, so the attention is the masked attention whatever the layout; the split only fixes the order.
    positions None and mask None: causal over the prefix and the new tokens.
    """
    if positions is None and mask is None and T == 1 and isinstance(start, int) and start >= width - 1:
        return SplitMask(length=start + 1)  # plain decoding: the tail is the last W slots (same numbers as below)
    dev = mask.device if mask is not None else positions.device if positions is not None else None
    if positions is None:
        positions = torch.arange(T, device=dev)[None] + start
    if mask is None:
        mask = causal_mask(T, start, dev)
    Bm, _, _, S = mask.shape
    B = max(Bm, positions.shape[0])
    m = mask[:, 0].expand(B, T, S)
    pos = positions.expand(B, T)
    want = pos[..., None] - (width - 1) + torch.arange(width, device=dev)  # (B, T, W) the tail's positions
    new = start + torch.arange(T, device=dev)  # the new tokens' slots
    match = m[..., new][:, :, None, :] & (pos[:, None, None, :] == want[..., None])  # (B, T, W, T)
    old = want < start
    # the visible new slot at that position (the last if several); amax, not argmax: inductor's vectorized
    # argmax over 17 new tokens returned an out-of-bounds index
    slot = torch.where(old, want, torch.where(match, new, -1).amax(-1)).clamp(min=0)
    ok = torch.where(old, (want >= 0) & m.gather(-1, slot), match.any(-1))
    in_tail = torch.zeros(B, T, S, dtype=torch.int32, device=dev).scatter_add(-1, slot, ok.int()) > 0
    bias = torch.tensor(float("-inf"), device=dev)
    zero = torch.zeros((), device=dev)
    return SplitMask(
        slot[:, None, None],
        torch.where(ok, zero, bias)[:, None, None],
        torch.where(m & ~in_tail, zero, bias)[:, None, None],
    )


def small_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of a few new queries over a cached prefix, summed by cache slot: two batched matmuls.

    Cheaper than `split_attention` in eager mode (fewer ops), but a tree node's sums depend on where its
    siblings sit, so only the draft uses it. q (B, H, T, d), k/v (B, Hk, S, d), mask (B|1, 1, T, S) bool.
    """
    B, H, T, d = q.shape
    Hk, S = k.shape[1], k.shape[2]
    G = H // Hk
    scores = (q.reshape(B, Hk, G * T, d) @ k.transpose(-1, -2)).float() * d**-0.5  # (B, Hk, G*T, S)
    if mask is not None:
        m = mask.expand(mask.shape[0], 1, T, S)[:, :, None].expand(-1, -1, G, -1, -1)
        scores = scores.masked_fill(~m.reshape(mask.shape[0], 1, G * T, S), float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v).reshape(B, H, T, d)


def block_weighted_sum(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_s p[..., s] * v[..., s, :] as GEMMs over blocks of exactly BLOCK slots, the block results added in order.

    p (B, Hk, M, K) in v's dtype, zero past the slots to weight; v (B, Hk, >=K, d) -> (B, Hk, M, d) float32.
    Why: one GEMM over all K slots rounds differently for different K (the CPU kernels pick their blocking by K),
    so a query verified in a tree (K: the tree's cache length) and decoded alone (K: its own prefix) parted in
    bf16 at near-ties. With fixed-size blocks, slots past the weighted ones only add exact zeros.
    """
    B, Hk, M, K = p.shape
    Kp = round_up(K, BLOCK)
    if Kp != K:
        p = F.pad(p, (0, Kp - K))
    if v.shape[2] < Kp:  # the cache could not lend slots up to a block boundary
        v = F.pad(v, (0, 0, 0, Kp - v.shape[2]))
    n, d = Kp // BLOCK, v.shape[-1]
    blocks = p.reshape(B, Hk, M, n, BLOCK).transpose(2, 3) @ v[:, :, :Kp].reshape(B, Hk, n, BLOCK, d)
    return blocks.float().sum(2)  # (B, Hk, n, M, d) -> (B, Hk, M, d): a vertical sum, in block order


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm: SplitMask) -> torch.Tensor:
    """Attention of a few new queries over a cached prefix, exact across cache layouts.

    A query's keys split in two: its last W positions, gathered in position order, and the prefix
    before them, summed in place. Why: a token verified in a tree sees its ancestors in slots that skip
    its siblings, while decoded alone it sees them in consecutive slots, and the cache it reads is longer
    by the tree. Every sum must therefore be independent of both the layout and the length:
    - the tail is summed in position order (W fixed);
    - the softmax denominator of the prefix is a running sum (`cumsum`, sequential), so the masked slots
      after the query's keys add exact zeros;
    - the prefix's weighted values go through `block_weighted_sum` (fixed-size GEMMs).
    So in bf16 every query sums the same numbers in the same order however the tree was laid out (tested
    bitwise, `tests/test_attention.py`). Not SDPA: PyTorch's CPU flash-attention kernel costs ~7x more for
    1-32 queries over a few hundred keys. Query heads sharing a KV head are rows of one matmul.
    q (B, H, T, d), k/v (B, Hk, S, d) (S may run past the attended slots: a cache view up to a BLOCK
    boundary) -> (B, H, T, d).
    """
    B, H, T, d = q.shape
    Hk = k.shape[1]
    G = H // Hk
    scale = d**-0.5
    scores = (q.reshape(B, Hk, G * T, d) @ k.transpose(-1, -2)).float().view(B, Hk, G, T, -1)
    if sm.tail is None:  # plain decoding: slices instead of gathers (same numbers, fewer ops)
        n, W = sm.length, TAIL
        tail, shared = scores[..., n - W : n] * scale, scores[..., : n - W] * scale
        v_tail = v[:, :, n - W : n]
    else:  # scale * score + bias (0 or -inf): one op per part
        W = sm.tail.shape[-1]
        tail = torch.add(sm.tail_bias, scores.gather(-1, sm.tail.expand(B, Hk, G, T, W)), alpha=scale)
        shared = torch.add(sm.shared_bias, scores[..., : sm.shared_bias.shape[-1]], alpha=scale)
        if sm.tail.shape[0] == 1:
            v_tail = v.index_select(2, sm.tail.view(-1))
        else:
            v_tail = v.gather(2, sm.tail.reshape(B, 1, T * W, 1).expand(B, Hk, T * W, d))
    top = tail.amax(-1, keepdim=True)
    if shared.shape[-1]:
        top = torch.maximum(top, shared.amax(-1, keepdim=True))
    e_tail, e_shared = (tail - top).exp(), (shared - top).exp()
    den = e_tail.sum(-1, keepdim=True)
    if shared.shape[-1]:
        den = den + e_shared.cumsum(-1)[..., -1:]
    p_tail, p_shared = (e_tail / den).to(v.dtype), (e_shared / den).to(v.dtype)
    y = block_weighted_sum(p_shared.view(B, Hk, G * T, -1), v).view(B, Hk, G, T, d)
    y_tail = (p_tail[..., None] * v_tail.reshape(B, Hk, 1, T, W, d)).sum(-2, dtype=torch.float32)
    return (y + y_tail).to(v.dtype).reshape(B, H, T, d)


def causal_mask(T: int, start: int, device=None) -> torch.Tensor:
    """(1, 1, T, start+T) bool: the cached prefix is visible, new tokens see themselves causally."""
    q = torch.arange(T, device=device)[:, None] + start
    k = torch.arange(start + T, device=device)[None, :]
    return (k <= q)[None, None]
