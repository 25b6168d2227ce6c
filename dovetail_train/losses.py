"""Pure loss and metric functions for draft distillation.

Alignment (EAGLE): the draft reads (f_i, t_{i+1}) and predicts f_{i+1}. A position counts when t_{i+1}
is an assistant token, i.e. exactly the positions the draft sees while the model writes a reply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shift_batch(input_ids: torch.Tensor, hidden: torch.Tensor, loss_mask: torch.Tensor):
    """-> feat_in f_i (B,T-1,D), tok_in t_{i+1} (B,T-1), feat_target f_{i+1} (B,T-1,D), mask (B,T-1)."""
    return hidden[:, :-1], input_ids[:, 1:], hidden[:, 1:], loss_mask[:, 1:].float()


def uniform_noise(
    feat: torch.Tensor, std: float, generator: torch.Generator | None = None, scale_by_length: bool = False
) -> torch.Tensor:
    """Uniform noise of width `std` (U(-std/2, std/2)) on the input features, as in EAGLE's training.

    `scale_by_length` widens it by 512 / T for a batch of T positions, as the official EAGLE/Dovetail code does
    (short batches get more noise, long ones less).
    """
    if std <= 0:
        return feat
    width = std * 512 / feat.shape[1] if scale_by_length else std
    noise = torch.rand(feat.shape, generator=generator, device=feat.device, dtype=feat.dtype)
    return feat + (noise - 0.5) * width


def distill_losses(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    head_weight: torch.Tensor,
    w_feat: float = 1.0,
    w_tok: float = 0.1,
    vocab_ids: torch.Tensor | None = None,
    full_head: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """w_feat * SmoothL1(pred, f_next) + w_tok * CE(softmax(head(f_next)), log_softmax(head(pred))).

    Both terms are averaged over masked positions only; the LM head runs only on those positions.
    `head_weight` holds the rows the token loss runs over: the whole LM head, or the rows of the draft vocabulary
    `vocab_ids` (the tokens inference proposes from). Over a draft vocabulary the target's distribution is
    renormalised over those tokens: the draft can never propose the others, so their mass teaches nothing, and the
    feature loss still pulls the whole prediction towards f_next. `top1_acc` compares argmaxes over the same rows;
    given `full_head`, the target's argmax is taken over the whole vocabulary instead and a target token outside
    the draft vocabulary counts as a miss (what inference would see).
    """
    sel = mask.reshape(-1) > 0
    n = sel.sum().clamp(min=1)
    p = pred.reshape(-1, pred.shape[-1])[sel]
    t = target.reshape(-1, target.shape[-1])[sel].to(p.dtype)
    feat_loss = F.smooth_l1_loss(p.float(), t.float(), reduction="sum") / (n * p.shape[-1])
    w = head_weight.to(p.dtype)
    with torch.no_grad():
        t_logits = (t @ w.T).float()
        t_prob = t_logits.softmax(-1)
        t_top = t_logits.argmax(-1)
    p_logits = (p @ w.T).float()
    tok_loss = -(t_prob * p_logits.log_softmax(-1)).sum() / n
    with torch.no_grad():
        p_top = p_logits.argmax(-1)
        if full_head is not None:
            t_top = (t @ full_head.to(p.dtype).T).argmax(-1)
            if vocab_ids is not None:
                p_top = vocab_ids[p_top]
        top1 = (p_top == t_top).float().sum() / n
    return {
        "loss": w_feat * feat_loss + w_tok * tok_loss,
        "feat_loss": feat_loss.detach(),
        "tok_loss": tok_loss.detach(),
        "top1_acc": top1.detach(),
        "n_tokens": n.detach().float(),
    }


@torch.no_grad()
def simulated_tau(
    draft_fn,
    feat_in: torch.Tensor,
    tok_emb: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    head_weight: torch.Tensor,
    steps: int,
    draft_head: torch.Tensor | None = None,
    vocab_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expected accepted length of a `steps`-token chain rolled out from the draft's own features.

    Step s feeds the draft the features it predicted at step s-1 (shifted by one position), so the
    chain starting at position i is accepted while the draft's argmax token matches the target's at
    i, i+1, ...; τ = 1 + mean accepted tokens over assistant positions (the target's bonus token).
    The target's argmax is over the full head; the draft's over `draft_head` (the draft vocabulary's rows, ids
    `vocab_ids`) when given, as inference proposes. Head products run on assistant positions only.
    A cheap proxy of true speculative decoding, computed in `steps` parallel draft forwards.
    """
    valid = mask > 0
    w = head_weight.to(feat_in.dtype)
    dh = w if draft_head is None else draft_head.to(feat_in.dtype)
    t_top = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)  # -1 / -2: never equal off the mask
    t_top[valid] = (target[valid].to(w.dtype) @ w.T).argmax(-1)
    feats = feat_in
    alive = valid
    accepted = torch.zeros_like(mask, dtype=torch.float32)
    T = feat_in.shape[1]
    for s in range(steps):
        pred = draft_fn(feats, tok_emb)
        p_top = torch.full_like(t_top, -2)
        top = (pred[valid].to(dh.dtype) @ dh.T).argmax(-1)
        p_top[valid] = top if vocab_ids is None else vocab_ids[top]
        match = p_top == t_top  # (B, T)
        # the chain starting at i uses step s's prediction at position i + s
        shifted = torch.zeros_like(alive)
        if s < T:
            shifted[:, : T - s] = match[:, s:]
        alive = alive & shifted
        accepted += alive.float()
        feats = torch.cat([feat_in[:, :1], pred[:, :-1]], dim=1)
    return 1.0 + accepted[valid].mean() if valid.any() else torch.tensor(1.0)
