"""Speculative decoding (EAGLE flow): target prefill -> [draft a tree -> transfer -> verify -> accept]*.

The draft runs on `draft_device` with its own copies of the target's embedding and LM head; the target
stays on its device. Only token ids (plus, when sampling, the draft distributions the tree's children
were drawn from) go to the target, and only the accepted tokens and their true features come back.

Draft bookkeeping: draft entry i takes (f_i, emb(t_{i+1})) at RoPE position i and predicts f_{i+1},
as in training. A tree node at depth d (sequence position L+d, L = committed length) is expanded with
its parent's *predicted* feature at position L+d-1, written past the draft cache's committed length
as scratch under a tree mask; after verification the scratch is overwritten by the accepted tokens
paired with their *true* target features.

Prompt lookup (`InferConfig.lookup`): when the text so far ends in an n-gram that appeared before, the
tokens that followed it are verified as a chain instead of a draft tree (no draft forward that step);
the draft still commits every accepted token with its true feature, so it stays in sync.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dovetail_infer.baseline import autoregressive, finish, next_token, sync
from dovetail_infer.checkpoint import frequent_token_ids, load_draft, load_token_counts
from dovetail_infer.compiled import CompiledForward, compile_mode, compiled_forward
from dovetail_infer.kv_cache import KVCache
from dovetail_infer.lookup import NGramIndex
from dovetail_infer.models.draft import DraftModel
from dovetail_infer.models.llama import (
    QUANT_BITS,
    PackedLinear,
    can_pack,
    pack_linears,
    quant_linear,
    quantizable,
    quantize_linears,
)
from dovetail_infer.models.target import Target
from dovetail_infer.sampling import greedy_accept, gumbel_pick, log_probs, probs, sample_accept
from dovetail_infer.text import ChatResult, TextStream, infer_config
from dovetail_infer.tree import DraftTree, graft_chain, grow_tree, topk_pick

log = logging.getLogger(__name__)


@dataclass
class InferConfig:
    budget: int = 8  # draft tokens per target forward (tree nodes, root excluded)
    depth: int = 6
    top_k: int = 4
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    min_prob: float = 0.0  # greedy: stop drafting below this cumulative draft probability (0 = full depth)
    # prompt lookup: when the text so far ends in an n-gram seen before (prompt or answer), verify up to this
    # many tokens that followed it as a chain instead of drafting (no draft step; 0 = off)
    lookup: int = 0
    # greedy only: draft the tree on lookup steps too and verify the looked-up chain as a branch of it (within
    # max(budget, lookup) tokens) instead of alone
    lookup_graft: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("budget", "depth", "top_k", "max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"InferConfig.{name} must be an integer >= 1, got {v!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"InferConfig.temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not 0 <= self.min_prob < 1:
            raise ValueError(f"InferConfig.min_prob must be in [0, 1), got {self.min_prob!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"InferConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.lookup, bool) or not isinstance(self.lookup, int) or self.lookup < 0:
            raise ValueError(f"InferConfig.lookup must be an integer >= 0 (0 = off), got {self.lookup!r}")
        if not isinstance(self.lookup_graft, bool):
            raise ValueError(f"InferConfig.lookup_graft must be true or false, got {self.lookup_graft!r}")
        if self.lookup_graft and self.temperature > 0:
            raise ValueError(
                "InferConfig.lookup_graft is greedy only (a looked-up branch beside sampled siblings has no draft "
                "distribution to verify against): set temperature=0 or lookup_graft=false"
            )


def check_draft_quant(draft_quant: str | None) -> None:
    if draft_quant is not None and draft_quant not in QUANT_BITS:
        raise ValueError(f"draft_quant must be null or one of {sorted(QUANT_BITS)}, got {draft_quant!r}")


@dataclass
class GenerationResult:
    output_ids: list[int]  # new tokens only, EOS included when generated
    new_tokens: int
    forwards: int  # target forwards after prefill
    tau: float  # tokens made by decoding forwards / forwards (the first new token comes from prefill)
    accept_lengths: list[int] = field(default_factory=list)  # accepted draft tokens per forward
    accepted_per_depth: list[int] = field(default_factory=list)  # forwards that accepted a draft token at depth d+1
    prefill_s: float = 0.0
    decode_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    transfer_s: float = 0.0
    other_s: float = 0.0
    transfer_bytes: int = 0
    tokens_per_s: float = 0.0
    lookup_forwards: int = 0  # forwards that verified a prompt-lookup chain instead of a draft tree
    lookup_accepted: int = 0  # looked-up tokens those forwards accepted


class _Clock:
    """Accumulates wall time per key, synchronising CUDA around each timed region."""

    def __init__(self, *devices: torch.device) -> None:
        self.devices, self.s = devices, defaultdict(float)

    @contextmanager
    def __call__(self, key: str):
        sync(*self.devices)
        t0 = time.perf_counter()
        yield
        sync(*self.devices)
        self.s[key] += time.perf_counter() - t0


class Dovetail:
    """A target plus an optional draft. `generate` decodes speculatively; `generate_baseline` does not."""

    def __init__(
        self,
        target: Target,
        draft: DraftModel | None,
        draft_device: str | None = None,
        max_len: int | None = None,
        draft_vocab: int | None = None,
        token_counts: torch.Tensor | None = None,
        compile: bool | str = False,
        draft_quant: str | None = None,
    ) -> None:
        self.target = target
        # the target's decode/verify forward: eager, or torch.compile'd with static shapes (see compiled.py);
        # compile="max-autotune" tunes the target's products (the draft's small step keeps the default mode)
        mode = compile_mode(compile)
        self.t_forward = compiled_forward(target.model, mode) if mode else target.model
        self.tdev = target.device
        self.ddev = torch.device(draft_device or ("cuda" if torch.cuda.is_available() else "cpu"))
        ctx = target.config.max_position_embeddings
        self.max_len = min(max_len, ctx) if max_len else ctx
        self.draft = None if draft is None else draft.to(self.ddev).eval().requires_grad_(False)
        if self.draft is not None:  # the draft side's own embedding / LM head (shared when nothing moves)
            ddtype = next(self.draft.parameters()).dtype
            self.d_embed = target.embed.weight.detach().to(self.ddev, ddtype)
            self.d_head = target.lm_head.weight.detach().to(self.ddev, ddtype)
            self.d2t = self._draft_vocab(draft_vocab, token_counts)
            if self.d2t is not None:  # the draft proposes from the most frequent tokens only: a cheaper head
                self.d_head = self.d_head[self.d2t].contiguous()
            head = torch.nn.Linear(self.d_head.shape[1], self.d_head.shape[0], bias=False, device="meta")
            head.weight = torch.nn.Parameter(self.d_head, requires_grad=False)
            self.d_head_fn: torch.nn.Module = head
            pack = can_pack(self.ddev, ddtype)  # oneDNN-prepacked weights: ~2x faster few-row products
            if draft_quant or pack:  # the linears are swapped below: the caller's draft stays as it was
                self.draft = copy.deepcopy(self.draft)
            if draft_quant:  # weight-only int8/int4 draft (CPU kernels); the target still decides every token
                check_draft_quant(draft_quant)
                if self.ddev.type != "cpu":
                    raise ValueError(f"draft_quant={draft_quant} uses CPU kernels: the draft runs on {self.ddev}")
                quantize_linears(self.draft, draft_quant)
                if quantizable(head, QUANT_BITS[draft_quant]):
                    self.d_head_fn = quant_linear(head, draft_quant)
            if pack:  # what quantization left as nn.Linear, as the target's loader does
                pack_linears(self.draft)
                if self.d_head_fn is head:
                    self.d_head_fn = PackedLinear(head)
            self.d_forward = compiled_forward(self.draft) if mode else self.draft
        self._tcache: KVCache | None = None
        self._dcache: KVCache | None = None

    def _draft_vocab(self, size: int | None, counts: torch.Tensor | None) -> torch.Tensor | None:
        """Ids of the `size` most frequent target tokens (the training loss's vocabulary), or None."""
        V = self.target.config.vocab_size
        if size is None or size >= V:
            return None
        if size < 1:
            raise ValueError(f"draft_vocab must be >= 1 (or null for the full vocabulary), got {size}")
        if counts is None or counts.numel() != V:
            raise ValueError(
                f"draft_vocab={size} needs the draft dir's token counts over the target vocabulary ({V}); "
                "this draft has none: use draft_vocab=null"
            )
        return frequent_token_ids(counts, size).to(self.ddev)

    @classmethod
    def from_pretrained(
        cls,
        draft_dir: str | Path,
        target: Target,
        draft_device: str | None = None,
        draft_vocab: int | None = None,
        draft_dtype: torch.dtype | None = None,
        compile: bool | str = False,
        draft_quant: str | None = None,
    ) -> Dovetail:
        """Load an exported draft dir; refuses a draft trained for another target.

        The draft runs in `draft_dtype`, by default the target's (bfloat16 halves the draft head's reads).
        """
        dev = draft_device or ("cuda" if torch.cuda.is_available() else "cpu")
        draft, _ = load_draft(draft_dir, target.identity(), device=dev, dtype=draft_dtype or target.dtype)
        counts = load_token_counts(draft_dir) if draft_vocab else None
        if draft_vocab and counts is None:
            log.warning(
                "%s has no token counts: draft_vocab=%s ignored, the draft uses the full vocabulary",
                draft_dir,
                draft_vocab,
            )
            draft_vocab = None
        return cls(
            target, draft, dev, draft_vocab=draft_vocab, token_counts=counts, compile=compile, draft_quant=draft_quant
        )

    # ---- setup ----------------------------------------------------------------------------------

    def _check(self, prompt_ids: list[int], cfg: InferConfig, budget: int) -> None:
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: give at least one token (e.g. the BOS token)")
        V = self.target.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= V:
            raise ValueError(
                f"prompt_ids must be token ids in [0, {V}), got min {min(prompt_ids)} max {max(prompt_ids)}"
            )
        need = len(prompt_ids) + cfg.max_new_tokens + budget
        if need > self.max_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({cfg.max_new_tokens}) + budget ({budget}) = "
                f"{need} positions exceed the context of {self.max_len} (target max_position_embeddings or max_len): "
                "shorten the prompt or lower max_new_tokens"
            )

    def check_prompt(self, prompt_ids: list[int], cfg: InferConfig | None = None) -> None:
        """Raise ValueError when `prompt_ids` cannot be decoded with `cfg` (empty, bad ids, past the context)."""
        cfg = cfg or InferConfig()
        self._check(prompt_ids, cfg, max(self._budget(cfg), cfg.lookup))

    # ---- text in, text out ----------------------------------------------------------------------

    def stream(
        self,
        messages: list[dict[str, str]],
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        infer: InferConfig | None = None,
    ) -> TextStream:
        """The reply to chat `messages` (the target's chat template applied) as an iterator of text deltas;
        `.result` holds usage, τ and tokens/s once it is exhausted. `infer` sets the tree shape."""
        cfg = infer_config(infer or InferConfig(), max_tokens, temperature, top_p, seed)
        return TextStream(self, messages, cfg, stop)

    def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> ChatResult:
        """The whole reply to chat `messages` (same arguments as `stream`): text, finish reason, usage, τ."""
        stream = self.stream(messages, **kwargs)
        for _ in stream:
            pass
        return stream.result

    def _caches(self, n_target: int, n_draft: int, t_new: int = 1, d_new: int = 1) -> tuple[KVCache, KVCache | None]:
        """Static caches, reallocated only when a longer generation needs more room. Compiled steps are
        compiled here for up to `t_new` (target) / `d_new` (draft) tokens per forward, outside timed regions."""
        tdtype = self.target.dtype
        self._tcache = self._cache(self._tcache, self.t_forward, self.target.config, tdtype, n_target, t_new, self.tdev)
        if self.draft is not None:
            dtype, dim = self.d_embed.dtype, self.d_embed.shape[1]
            example = (torch.zeros(1, 1, dim, dtype=dtype, device=self.ddev),) * 2  # features, embeddings
            cfg = self.draft.config.layer_config()
            self._dcache = self._cache(self._dcache, self.d_forward, cfg, dtype, n_draft, d_new, self.ddev, example)
        return self._tcache, self._dcache

    def _cache(self, cache, forward, cfg, dtype, need: int, new: int, dev: torch.device, example=()) -> KVCache:
        compiled = isinstance(forward, CompiledForward)
        if compiled:  # room for padded buckets; coarse sizes: every cache size is another compiled graph
            need += forward.bucket(new) or 0
        step = 512 if compiled else 256
        size = min(-(-need // step) * step, max(self.max_len, need))
        # eager attention reads only the filled prefix, so a larger cache costs nothing there; a compiled step
        # attends over the whole buffer under a mask, so after a long prompt a short one gets a smaller cache
        # again (SmolLM2 int4, 1 token at context 300: 8.4 ms over 512 slots, 9.5 over 1024, 10.2 over 1536),
        # unless the compiled step says recompiling for another size costs too much (`refit_cache`)
        refit = compiled and forward.refit_cache
        if cache is None or cache.max_len < need or (refit and cache.max_len != size):
            cache = KVCache.for_model(cfg, size, dtype=dtype, device=dev)
        if compiled:
            forward.warmup(cache, (new,), example)
        return cache

    def _budget(self, cfg: InferConfig) -> int:
        return cfg.budget if self.draft is not None else 0

    # ---- draft side -----------------------------------------------------------------------------

    def _draft_step(self, feats: torch.Tensor, next_ids: list[int], start: int) -> torch.Tensor:
        """Commit (true feature, next token) pairs at [start, start+T); returns the last predicted feature."""
        dc = self._dcache
        ids = torch.tensor(next_ids, device=self.ddev)
        dc.rollback(start)  # drops the previous tree's scratch
        out = self.d_forward(feats[None], F.embedding(ids, self.d_embed)[None], cache=dc, start=start)
        dc.length = start + len(next_ids)
        return out[0, -1]

    def _grow(self, root: int, pred: torch.Tensor, cfg: InferConfig, gen: torch.Generator):
        """Draft a tree below `root` from the root's predicted feature `pred` (D,)."""
        dc, nd = self._dcache, self._dcache.length
        sampling = cfg.temperature > 0
        state = {"feats": pred[None], "vis": torch.zeros(1, 0, dtype=torch.bool, device=self.ddev)}

        def log_q(h: torch.Tensor) -> torch.Tensor:
            # over the draft vocabulary only (tokens outside it have q = 0): picks map back to target ids
            return log_probs(self.d_head_fn(h), cfg.temperature, cfg.top_p)

        def expand(parent_rows: list[int], tokens: list[int], depth: int) -> torch.Tensor:
            n_new, rows = len(tokens), torch.tensor(parent_rows, device=self.ddev)
            prev = state["vis"][rows]  # (F, scratch so far): each parent's visible scratch slots
            slot = prev.shape[1]
            vis = torch.cat([prev, torch.eye(n_new, dtype=torch.bool, device=self.ddev)], 1)
            mask = torch.cat([torch.ones(n_new, nd, dtype=torch.bool, device=self.ddev), vis], 1)
            pos = torch.full((1, n_new), nd + depth - 1, device=self.ddev)
            emb = F.embedding(torch.tensor(tokens, device=self.ddev), self.d_embed)
            x = state["feats"][rows][None]
            out = self.d_forward(x, emb[None], positions=pos, mask=mask[None, None], cache=dc, start=nd + slot)[0]
            state["feats"] = out
            state["vis"] = vis
            return log_q(out)

        pick_draft = (lambda lq, k: gumbel_pick(lq, k, gen)) if sampling else topk_pick
        if self.d2t is None:
            pick = pick_draft
        else:  # draft-vocabulary indices -> target token ids

            def pick(lq: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
                idx, score = pick_draft(lq, k)
                return self.d2t[idx], score

        # early stop only when greedy: with sampling the tree's shape must not depend on sampled values
        floor = math.log(cfg.min_prob) if cfg.min_prob > 0 and not sampling else float("-inf")
        return grow_tree(root, log_q(pred), expand, cfg.budget, cfg.depth, cfg.top_k, pick, floor)

    def _full_vocab(self, q: torch.Tensor) -> torch.Tensor:
        """A draft distribution over the draft vocabulary (V_d,) as one over the target's (V,): zeros elsewhere."""
        if self.d2t is None:
            return q
        return q.new_zeros(self.target.config.vocab_size).index_copy_(0, self.d2t, q)

    # ---- decoding -------------------------------------------------------------------------------

    def generate(self, prompt_ids: list[int], cfg: InferConfig | None = None) -> GenerationResult:
        """Speculative decoding of one prompt; greedy output equals the target's own, sampling is lossless."""
        steps = self.decode_steps(prompt_ids, cfg)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    @torch.no_grad()
    def decode_steps(self, prompt_ids: list[int], cfg: InferConfig | None = None) -> Iterator[list[int]]:
        """`generate` as a generator: yields the new tokens of each step (the prefill's first token, then each
        target forward's accepted tokens and bonus token) and returns the GenerationResult. Closing it early stops
        decoding (a streaming caller that met a stop string)."""
        cfg = cfg or InferConfig()
        budget = max(self._budget(cfg), cfg.lookup)  # rows verified beyond the root, at most
        self._check(prompt_ids, cfg, budget)
        n, model, eos = len(prompt_ids), self.target.model, self.target.eos_ids
        tc, dc = self._caches(
            n + cfg.max_new_tokens + budget,
            n + cfg.max_new_tokens + cfg.top_k * cfg.depth + 1,
            budget + 1,
            max(cfg.top_k, cfg.depth + 1),
        )
        tgen = torch.Generator(self.tdev).manual_seed(cfg.seed)
        dgen = torch.Generator(self.ddev).manual_seed((cfg.seed * 6364136223846793005 + 1442695040888963407) % 2**63)
        clock, nbytes = _Clock(self.tdev, self.ddev), 0
        sampling = cfg.temperature > 0

        with clock("prefill"):
            tc.reset()
            h = model(torch.tensor([prompt_ids], device=self.tdev), cache=tc, start=0)[0]
            tc.length = n
            out, stop = finish(
                [next_token(model.logits(h[-1]), cfg.temperature, cfg.top_p, tgen)], eos, cfg.max_new_tokens
            )
            if self.draft is not None and not stop:
                feats = h.to(self.ddev, self.d_embed.dtype)
                nbytes += h.numel() * h.element_size() + 8 * n
                dc.reset()
                pred = self._draft_step(feats, list(prompt_ids[1:]) + out, 0)
            index = NGramIndex(list(prompt_ids) + out) if cfg.lookup else None
        yield list(out)

        t_decode = time.perf_counter()
        forwards, accept_lengths, per_depth = 0, [], [0] * max(cfg.depth, cfg.lookup)
        lookups = lookup_accepted = 0
        graft = cfg.lookup_graft and self.draft is not None
        while not stop:
            root = out[-1]
            with clock("draft"):
                look = index.propose(cfg.lookup) if index is not None else []
                look_nodes = list(range(1, len(look) + 1))
                if look and not graft:  # the text repeats an n-gram seen before: verify what followed it, no draft
                    tree, dists = DraftTree.chain(root, look), {}
                elif self.draft is not None:
                    tree, dists = self._grow(root, pred, cfg, dgen)
                    if look:  # the looked-up chain as a branch of the draft's tree
                        tree, look_nodes = graft_chain(tree, look, budget)
                else:
                    tree, dists = DraftTree.root_only(root), {}
            with clock("transfer"):  # token ids and parents (and the q rows sampling verifies with)
                ids = torch.tensor(tree.tokens, device=self.tdev)
                nbytes += 16 * len(tree.tokens)
                q_rows = {}
                if sampling and look:  # a looked-up token was proposed with certainty: q is one-hot
                    V = self.target.config.vocab_size
                    q_rows = {i: F.one_hot(ids[i + 1], V).double() for i in range(len(look))}
                elif sampling:
                    for node in {p for p in tree.parents if p >= 0}:
                        q_rows[node] = self._full_vocab(dists[tree.cand[node]].exp()).to(self.tdev)
                        nbytes += q_rows[node].numel() * q_rows[node].element_size()
            with clock("verify"):
                L, N1 = tc.length, len(tree.tokens)
                pos = (L + torch.tensor(tree.depths, device=self.tdev))[None]
                mask = torch.cat([torch.ones(N1, L, dtype=torch.bool, device=self.tdev), tree.mask(self.tdev)], 1)
                h = self.t_forward(ids[None], positions=pos, mask=mask[None, None], cache=tc, start=L)[0]  # (N+1, D)
                logits = model.logits(h)
                if sampling:
                    path, bonus = sample_accept(tree, probs(logits, cfg.temperature, cfg.top_p), q_rows, tgen)
                else:
                    path, bonus = greedy_accept(tree, logits)
                tc.commit([L + i for i in path], start=L)
            forwards += 1
            accept_lengths.append(len(path) - 1)
            if look:
                lookups, lookup_accepted = lookups + 1, lookup_accepted + len(set(path) & set(look_nodes))
            for d in range(len(path) - 1):
                per_depth[d] += 1
            new, stop = finish([tree.tokens[i] for i in path[1:]] + [bonus], eos, cfg.max_new_tokens - len(out))
            out += new
            yield new
            if index is not None:
                index.extend(new)
            if stop or self.draft is None:
                continue
            with clock("transfer"):  # accepted tokens and their true features back to the draft
                feats = h[path].to(self.ddev, self.d_embed.dtype)
                nbytes += h[path].numel() * h.element_size() + 8 * len(new)
            with clock("draft"):
                pred = self._draft_step(feats, new, dc.length)
        sync(self.tdev, self.ddev)
        decode_s = time.perf_counter() - t_decode
        s = clock.s
        return GenerationResult(
            output_ids=out,
            new_tokens=len(out),
            forwards=forwards,
            tau=(len(out) - 1) / forwards if forwards else 0.0,
            accept_lengths=accept_lengths,
            accepted_per_depth=per_depth,
            prefill_s=s["prefill"],
            decode_s=decode_s,
            draft_s=s["draft"],
            verify_s=s["verify"],
            transfer_s=s["transfer"],
            other_s=max(decode_s - s["draft"] - s["verify"] - s["transfer"], 0.0),
            transfer_bytes=nbytes,
            tokens_per_s=len(out) / decode_s if decode_s > 0 else 0.0,
            lookup_forwards=lookups,
            lookup_accepted=lookup_accepted,
        )

    @torch.no_grad()
    def generate_baseline(self, prompt_ids: list[int], cfg: InferConfig | None = None) -> GenerationResult:
        """Target-only autoregressive decoding on the target's device (the speedup reference)."""
        cfg = cfg or InferConfig()
        self._check(prompt_ids, cfg, 0)
        tc, _ = self._caches(len(prompt_ids) + cfg.max_new_tokens, 0)
        gen = torch.Generator(self.tdev).manual_seed(cfg.seed)
        out, forwards, prefill_s, decode_s = autoregressive(
            self.target.model,
            prompt_ids,
            tc,
            cfg.max_new_tokens,
            self.target.eos_ids,
            cfg.temperature,
            cfg.top_p,
            gen,
            self.t_forward,
        )
        return GenerationResult(
            output_ids=out,
            new_tokens=len(out),
            forwards=forwards,
            tau=(len(out) - 1) / forwards if forwards else 0.0,
            accept_lengths=[0] * forwards,
            prefill_s=prefill_s,
            decode_s=decode_s,
            verify_s=decode_s,
            tokens_per_s=len(out) / decode_s if decode_s > 0 else 0.0,
        )
