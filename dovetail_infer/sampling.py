"""Acceptance: greedy tree walk and lossless tree speculative sampling (recursive rejection sampling).

Lossless sampling, one node at a time: the node's draft children x_1..x_m were drawn WITHOUT
replacement from the draft distribution q (Gumbel-top-k; the draw order is the sibling order). With
p the target's distribution at the node: accept x_i with probability min(1, p(x_i)/q_i(x_i)); on a
rejection p <- norm(max(p - q_i, 0)) and q_{i+1} = q_i without x_i, renormalised; if every child is
rejected the bonus token is drawn from the residual p. Each step preserves "the output is p", so the
whole walk samples exactly the target's distribution, whatever q is.

Caveat the tree builder must respect: whether a child is in the tree may depend on its earlier
siblings and ancestors, never on its own sampled value (that would bias the proposal). The engine
therefore scores sampled children by their rank, not by their log-prob (see `gumbel_pick`).
"""

from __future__ import annotations

import math

import torch

from dovetail_infer.tree import DraftTree

RANK_LOG_PRIOR = math.log(0.5)  # score of a sampled child of rank r is (r + 1) * log(0.5)


def probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The sampling distribution (float32) for logits (..., V): softmax(logits / T) restricted to the
    smallest top set whose mass reaches top_p (at least one token), renormalised."""
    p = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, idx = p.sort(dim=-1, descending=True)
        drop = (sp.cumsum(-1) - sp) >= top_p  # the mass before a token already reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        p = torch.zeros_like(p).scatter(-1, idx, sp)
        p = p / p.sum(-1, keepdim=True)
    return p


def log_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """log of the draft's proposal distribution: log_softmax for greedy (temperature 0), else log(probs)."""
    if temperature <= 0:
        return torch.log_softmax(logits.float(), dim=-1)
    return probs(logits, temperature, top_p).log()


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum along the last dim, as `Tensor.argmax` (ties and NaN alike), but through
    `max`: on this CPU bf16 argmax over a 49k vocabulary costs ~180 us a row, `max` ~45 us (measured)."""
    return logits.max(-1).indices


def gumbel_pick(log_q: torch.Tensor, k: int, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k children per row sampled without replacement from q (Gumbel-top-k), in draw order.

    Scores depend on the rank only (and -inf past q's support), never on the sampled value, so the
    tree's shape cannot bias the proposals (see the module docstring)."""
    k = min(k, log_q.shape[-1])
    u = torch.rand(log_q.shape, generator=gen, device=log_q.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    tokens = (log_q.double() + gumbel).topk(k, dim=-1).indices
    rank = torch.arange(1, k + 1, device=log_q.device, dtype=torch.float64) * RANK_LOG_PRIOR
    scores = torch.where(log_q.gather(-1, tokens).isfinite(), rank.expand_as(tokens), float("-inf"))
    return tokens, scores


def greedy_accept(tree: DraftTree, target_logits: torch.Tensor) -> tuple[list[int], int]:
    """Walk from the root following the target's argmax. target_logits (N+1, V) at the tree's nodes.
    Returns the accepted node path (starting with the root, 0) and the target's bonus token."""
    best = argmax(target_logits).tolist()
    kids = tree.children()
    path = [0]
    while True:
        node = path[-1]
        nxt = next((c for c in kids[node] if tree.tokens[c] == best[node]), None)
        if nxt is None:
            return path, best[node]
        path.append(nxt)


def verify_node(
    p: torch.Tensor, q: torch.Tensor, candidates: list[int], gen: torch.Generator | None = None
) -> tuple[int | None, int]:
    """Recursive rejection sampling at one node. p, q (V,) distributions; candidates drawn from q
    without replacement, in draw order. Returns (index of the accepted candidate or None, token)."""
    p, q = p.double().clone(), q.double().clone()
    for i, x in enumerate(candidates):
        u = torch.rand((), generator=gen, device=p.device, dtype=torch.float64)
        if q[x] > 0 and u * q[x] < p[x]:
            return i, x
        residual = (p - q).clamp_min(0.0)
        if residual.sum() > 0:  # zero only when p == q, where x was accepted (up to rounding)
            p = residual / residual.sum()
        q[x] = 0.0
        if q.sum() <= 0:
            break
        q = q / q.sum()
    return None, int(torch.multinomial(p.float(), 1, generator=gen))


def sample_accept(
    tree: DraftTree,
    target_probs: torch.Tensor,
    draft_probs: dict[int, torch.Tensor],
    gen: torch.Generator | None = None,
) -> tuple[list[int], int]:
    """Lossless walk. target_probs (N+1, V) at the nodes; draft_probs[node] = q its children were drawn
    from (needed for nodes with children). Returns the accepted node path and the bonus token."""
    kids = tree.children()
    path = [0]
    while True:
        node = path[-1]
        siblings = sorted(kids[node], key=lambda c: tree.cand[c])  # draw order
        if not siblings:
            return path, int(torch.multinomial(target_probs[node].float(), 1, generator=gen))
        i, tok = verify_node(target_probs[node], draft_probs[node], [tree.tokens[c] for c in siblings], gen)
        if i is None:
            return path, tok
        path.append(siblings[i])
