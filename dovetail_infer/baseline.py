"""Target-only autoregressive decoding: the speedup reference, with the same static cache code."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from dovetail_infer.kv_cache import KVCache
from dovetail_infer.models.llama import LlamaModel
from dovetail_infer.sampling import argmax, probs


def sync(*devices: torch.device) -> None:
    if any(d.type == "cuda" for d in devices):
        torch.cuda.synchronize()


def next_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """Greedy (temperature 0) or sampled from `probs` for one row of logits (V,)."""
    if temperature <= 0:
        return int(argmax(logits))
    return int(torch.multinomial(probs(logits, temperature, top_p), 1, generator=gen))


def finish(tokens: list[int], eos_ids: Sequence[int], room: int) -> tuple[list[int], bool]:
    """Cut new tokens after the first EOS (kept, as HF generate does) and at `room` tokens left.
    Returns the kept tokens and whether decoding must stop."""
    eos = set(eos_ids)
    for i, t in enumerate(tokens):
        if t in eos:
            tokens = tokens[: i + 1]
            break
    stop = bool(eos.intersection(tokens)) or len(tokens) >= room
    return tokens[:room], stop


@torch.no_grad()
def autoregressive(
    model: LlamaModel,
    prompt_ids: Sequence[int],
    cache: KVCache,
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    gen: torch.Generator | None = None,
    forward: Callable[..., torch.Tensor] | None = None,
) -> tuple[list[int], int, float, float]:
    """Decode one token per target forward. Returns (new tokens, forwards after prefill, prefill_s, decode_s).

    `forward`: what runs the model's forward (default the model; a `CompiledForward` for static shapes)."""
    forward = forward or model
    dev = model.embed_tokens.weight.device
    sync(dev)
    t0 = time.perf_counter()
    cache.reset()
    h = model(torch.tensor([list(prompt_ids)], device=dev), cache=cache, start=0)
    cache.length = len(prompt_ids)
    out, stop = finish([next_token(model.logits(h[0, -1]), temperature, top_p, gen)], eos_ids, max_new_tokens)
    sync(dev)
    t1 = time.perf_counter()
    forwards = 0
    tok = torch.empty(1, 1, dtype=torch.long, device=dev)
    while not stop:
        tok.fill_(out[-1])
        start = cache.length
        h = forward(tok, cache=cache, start=start)
        cache.length = start + 1
        forwards += 1
        new, stop = finish(
            [next_token(model.logits(h[0, -1]), temperature, top_p, gen)], eos_ids, max_new_tokens - len(out)
        )
        out += new
    sync(dev)
    return out, forwards, t1 - t0, time.perf_counter() - t1
