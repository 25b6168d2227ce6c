"""Speculative decoding (EAGLE flow): target prefill -> [propose -> verify -> accept -> commit]*.

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

Code layout: `DraftSide` is the draft with its embedding, head, vocabulary map, forward and cache; a `_Generation`
is one prompt's decoding: `prefill`, then per target forward `propose` (a `Proposal`: a looked-up chain, the draft's
tree, or both) -> `verify` (ids and q rows to the target, one forward, acceptance) -> `accept` (statistics, the new
tokens) -> `commit` (accepted tokens with their true features back to the draft), and `result`.
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
from dovetail_infer.kv_cache import KVCache, round_up
from dovetail_infer.lookup import NGramIndex
from dovetail_infer.models.draft import DraftModel
from dovetail_infer.models.linear import (
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

# the draft proposes from this many of the target's most frequent tokens (its token counts) unless told otherwise;
# `evaluate.EVAL_DEFAULTS` and conf/infer/default.yaml take it from here (tests/test_defaults.py)
DRAFT_VOCAB = 4096


@dataclass
class InferConfig:
    """How one prompt is decoded. These defaults are the only ones: `evaluate.INFER_DEFAULTS` is built from them and
    conf/infer/default.yaml restates them for Hydra (tests/test_defaults.py checks every value)."""

    budget: int = 8  # draft tokens per target forward (tree nodes, root excluded)
    depth: int = 6
    top_k: int = 4
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    min_prob: float = 0.2  # greedy: stop drafting below this cumulative draft probability (0 = full depth)
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


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes held by `tensors`: what crosses between the target's and the draft's devices when they move."""
    return sum(t.numel() * t.element_size() for t in tensors)


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

    @classmethod
    def of(cls, output_ids: list[int], forwards: int, decode_s: float, **stats: Any) -> GenerationResult:
        """A result whose counts and rates (new tokens, τ, tokens/s) follow from the tokens, forwards and time."""
        n = len(output_ids)
        return cls(
            output_ids=output_ids,
            new_tokens=n,
            forwards=forwards,
            tau=(n - 1) / forwards if forwards else 0.0,
            decode_s=decode_s,
            tokens_per_s=n / decode_s if decode_s > 0 else 0.0,
            **stats,
        )


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


class DraftSide:
    """The draft and what it runs with on its device: its own copies of the target's embedding and LM head (the
    head cut to the draft vocabulary when `d2t` maps one to target ids), its forward (eager or compiled) and its
    KV cache. `commit` writes accepted tokens with their true features; `grow` drafts a tree on scratch past them.
    """

    def __init__(
        self,
        draft: DraftModel,
        target: Target,
        device: torch.device,
        draft_vocab: int | None = None,
        token_counts: torch.Tensor | None = None,
        compile: bool = False,
        draft_quant: str | None = None,
    ) -> None:
        self.device, self.vocab_size = device, target.config.vocab_size
        self.model = draft.to(device).eval().requires_grad_(False)
        dtype = next(self.model.parameters()).dtype  # the draft side's own embedding / LM head (shared if not moved)
        self.embed = target.embed.weight.detach().to(device, dtype)
        self.head = target.lm_head.weight.detach().to(device, dtype)
        self.d2t = self._vocab_map(draft_vocab, token_counts)
        if self.d2t is not None:  # the draft proposes from the most frequent tokens only: a cheaper head
            self.head = self.head[self.d2t].contiguous()
        self.head_fn = self._swap_linears(draft_quant, can_pack(device, dtype))
        self.forward = compiled_forward(self.model) if compile else self.model
        self.cache: KVCache | None = None

    def _vocab_map(self, size: int | None, counts: torch.Tensor | None) -> torch.Tensor | None:
        """Ids of the `size` most frequent target tokens (the training loss's vocabulary), or None."""
        V = self.vocab_size
        if size is None or size >= V:
            return None
        if size < 1:
            raise ValueError(f"draft_vocab must be >= 1 (or null for the full vocabulary), got {size}")
        if counts is None or counts.numel() != V:
            raise ValueError(
                f"draft_vocab={size} needs the draft dir's token counts over the target vocabulary ({V}); "
                "this draft has none: use draft_vocab=null"
            )
        return frequent_token_ids(counts, size).to(self.device)

    def _swap_linears(self, draft_quant: str | None, pack: bool) -> torch.nn.Module:
        """Quantize (weight-only int8/int4, CPU kernels) and/or oneDNN-prepack the draft's linears on a copy (the
        caller's draft stays as it was); returns the LM head as a module treated the same way."""
        head = torch.nn.Linear(self.head.shape[1], self.head.shape[0], bias=False, device="meta")
        head.weight = torch.nn.Parameter(self.head, requires_grad=False)
        head_fn: torch.nn.Module = head
        if draft_quant or pack:
            self.model = copy.deepcopy(self.model)
        if draft_quant:  # the target still decides every token: lossless
            check_draft_quant(draft_quant)
            if self.device.type != "cpu":
                raise ValueError(f"draft_quant={draft_quant} uses CPU kernels: the draft runs on {self.device}")
            quantize_linears(self.model, draft_quant)
            if quantizable(head, QUANT_BITS[draft_quant]):
                head_fn = quant_linear(head, draft_quant)
        if pack:  # what quantization left as nn.Linear, as the target's loader does (faster few-row products)
            pack_linears(self.model)
            if head_fn is head:
                head_fn = PackedLinear(head)
        return head_fn

    def commit(self, feats: torch.Tensor, next_ids: torch.Tensor, start: int) -> torch.Tensor:
        """Write (true feature, next token) pairs at [start, start+T), dropping the previous tree's scratch;
        returns the last predicted feature."""
        self.cache.rollback(start)
        out = self.forward(feats[None], F.embedding(next_ids, self.embed)[None], cache=self.cache, start=start)
        self.cache.length = start + len(next_ids)
        return out[0, -1]

    def grow(
        self, root: int, pred: torch.Tensor, cfg: InferConfig, gen: torch.Generator
    ) -> tuple[DraftTree, dict[int, torch.Tensor]]:
        """Draft a tree below `root` from the root's predicted feature `pred` (D,); returns it and the draft's
        log-distributions by candidate row."""
        dc, nd, dev = self.cache, self.cache.length, self.device
        sampling = cfg.temperature > 0
        state = {"feats": pred[None], "vis": torch.zeros(1, 0, dtype=torch.bool, device=dev)}

        def log_q(h: torch.Tensor) -> torch.Tensor:
            # over the draft vocabulary only (tokens outside it have q = 0): picks map back to target ids
            return log_probs(self.head_fn(h), cfg.temperature, cfg.top_p)

        def expand(parent_rows: list[int], tokens: list[int], depth: int) -> torch.Tensor:
            n_new, rows = len(tokens), torch.tensor(parent_rows, device=dev)
            prev = state["vis"][rows]  # (F, scratch so far): each parent's visible scratch slots
            slot = prev.shape[1]
            vis = torch.cat([prev, torch.eye(n_new, dtype=torch.bool, device=dev)], 1)
            mask = torch.cat([torch.ones(n_new, nd, dtype=torch.bool, device=dev), vis], 1)
            pos = torch.full((1, n_new), nd + depth - 1, device=dev)
            emb = F.embedding(torch.tensor(tokens, device=dev), self.embed)
            x = state["feats"][rows][None]
            out = self.forward(x, emb[None], positions=pos, mask=mask[None, None], cache=dc, start=nd + slot)[0]
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

    def full_vocab(self, q: torch.Tensor) -> torch.Tensor:
        """A draft distribution over the draft vocabulary (V_d,) as one over the target's (V,): zeros elsewhere."""
        if self.d2t is None:
            return q
        return q.new_zeros(self.vocab_size).index_copy_(0, self.d2t, q)


@dataclass
class Proposal:
    """What one step verifies below its root: a draft tree, a looked-up chain, or a tree with the chain grafted."""

    tree: DraftTree
    dists: dict[int, torch.Tensor]  # the draft's log-distributions by candidate row (empty without a draft tree)
    looked: int  # looked-up tokens in the tree (0 = no lookup this step)
    look_nodes: list[int]  # their tree nodes


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
        self.draft_side = (
            None
            if draft is None
            else DraftSide(draft, target, self.ddev, draft_vocab, token_counts, bool(mode), draft_quant)
        )
        self._tcache: KVCache | None = None

    @property
    def draft(self) -> DraftModel | None:
        """The draft model as the engine runs it (quantized or packed copies included), or None."""
        return None if self.draft_side is None else self.draft_side.model

    @classmethod
    def from_pretrained(
        cls,
        draft_dir: str | Path,
        target: Target,
        draft_device: str | None = None,
        draft_vocab: int | None = DRAFT_VOCAB,
        draft_dtype: torch.dtype | None = None,
        compile: bool | str = False,
        draft_quant: str | None = None,
    ) -> Dovetail:
        """Load an exported draft dir; refuses a draft trained for another target.

        The draft runs in `draft_dtype`, by default the target's (bfloat16 halves the draft head's reads).
        `draft_vocab`: the draft proposes from the N most frequent target tokens (null: all of them).
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
        side = self.draft_side
        if side is None:
            return self._tcache, None
        dtype, dim = side.embed.dtype, side.embed.shape[1]
        example = (torch.zeros(1, 1, dim, dtype=dtype, device=self.ddev),) * 2  # features, embeddings
        cfg = side.model.config.layer_config()
        side.cache = self._cache(side.cache, side.forward, cfg, dtype, n_draft, d_new, self.ddev, example)
        return self._tcache, side.cache

    def _cache(self, cache, forward, cfg, dtype, need: int, new: int, dev: torch.device, example=()) -> KVCache:
        compiled = isinstance(forward, CompiledForward)
        if compiled:  # room for padded buckets; coarse sizes: every cache size is another compiled graph
            need += forward.bucket(new) or 0
        step = 512 if compiled else 256
        size = min(round_up(need, step), max(self.max_len, need))
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
        return cfg.budget if self.draft_side is not None else 0

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
        run = _Generation(self, prompt_ids, cfg or InferConfig())
        yield run.prefill()
        run.start_decoding()
        while not run.stop:
            proposal = run.propose()
            h, path, bonus = run.verify(proposal)
            new = run.accept(proposal, path, bonus)
            yield new
            run.commit(new, h, path)
        return run.result()

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
        return GenerationResult.of(
            out, forwards, decode_s, accept_lengths=[0] * forwards, prefill_s=prefill_s, verify_s=decode_s
        )


class _Generation:
    """One speculative generation: prefill, then steps of propose -> verify -> accept -> commit. Holds the
    caches, the random generators, the timers and the statistics that become the GenerationResult."""

    def __init__(self, engine: Dovetail, prompt_ids: list[int], cfg: InferConfig) -> None:
        self.engine, self.cfg, self.side = engine, cfg, engine.draft_side
        self.budget = max(engine._budget(cfg), cfg.lookup)  # rows verified beyond the root, at most
        engine._check(prompt_ids, cfg, self.budget)
        self.prompt, n = list(prompt_ids), len(prompt_ids)
        self.tc, _ = engine._caches(
            n + cfg.max_new_tokens + self.budget,
            n + cfg.max_new_tokens + cfg.top_k * cfg.depth + 1,
            self.budget + 1,
            max(cfg.top_k, cfg.depth + 1),
        )
        self.tgen = torch.Generator(engine.tdev).manual_seed(cfg.seed)
        dseed = (cfg.seed * 6364136223846793005 + 1442695040888963407) % 2**63
        self.dgen = torch.Generator(engine.ddev).manual_seed(dseed)
        self.clock, self.nbytes = _Clock(engine.tdev, engine.ddev), 0
        self.sampling = cfg.temperature > 0
        self.graft = cfg.lookup_graft and self.side is not None
        self.out: list[int] = []
        self.stop = False
        self.pred: torch.Tensor | None = None  # the draft's predicted feature of the last committed token
        self.index: NGramIndex | None = None
        self.forwards, self.lookups, self.lookup_accepted, self.t_decode = 0, 0, 0, 0.0
        self.accept_lengths: list[int] = []
        self.per_depth = [0] * max(cfg.depth, cfg.lookup)

    def _to_draft(self, h: torch.Tensor, next_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """True features (from the target) and their next tokens, moved to the draft's device."""
        feats = h.to(self.side.device, self.side.embed.dtype)
        ids = torch.tensor(next_ids, device=self.side.device)
        self.nbytes += tensor_bytes(h, ids)
        return feats, ids

    def prefill(self) -> list[int]:
        """The prompt through the target (its first new token) and through the draft."""
        cfg, model = self.cfg, self.engine.target.model
        with self.clock("prefill"):
            self.tc.reset()
            h = model(torch.tensor([self.prompt], device=self.engine.tdev), cache=self.tc, start=0)[0]
            self.tc.length = len(self.prompt)
            first = next_token(model.logits(h[-1]), cfg.temperature, cfg.top_p, self.tgen)
            self.out, self.stop = finish([first], self.engine.target.eos_ids, cfg.max_new_tokens)
            if self.side is not None and not self.stop:
                feats, ids = self._to_draft(h, self.prompt[1:] + self.out)
                self.side.cache.reset()
                self.pred = self.side.commit(feats, ids, 0)
            self.index = NGramIndex(self.prompt + self.out) if cfg.lookup else None
        return list(self.out)

    def start_decoding(self) -> None:
        self.t_decode = time.perf_counter()

    def propose(self) -> Proposal:
        """A looked-up chain when the text repeats an n-gram seen before (no draft step), else the draft's tree
        (with the chain grafted as a branch under `lookup_graft`), else the root alone (no draft)."""
        root, cfg = self.out[-1], self.cfg
        with self.clock("draft"):
            look = self.index.propose(cfg.lookup) if self.index is not None else []
            look_nodes = list(range(1, len(look) + 1))
            if look and not self.graft:
                tree, dists = DraftTree.chain(root, look), {}
            elif self.side is not None:
                tree, dists = self.side.grow(root, self.pred, cfg, self.dgen)
                if look:
                    tree, look_nodes = graft_chain(tree, look, self.budget)
            else:
                tree, dists = DraftTree.root_only(root), {}
        return Proposal(tree, dists, len(look), look_nodes)

    def _q_rows(self, proposal: Proposal, ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Sampling only: the distributions each parent's children were drawn from, on the target's device."""
        if not self.sampling:
            return {}
        if proposal.looked:  # a looked-up token was proposed with certainty: q is one-hot, made on the target
            V = self.engine.target.config.vocab_size
            return {i: F.one_hot(ids[i + 1], V).double() for i in range(proposal.looked)}
        tree, q_rows = proposal.tree, {}
        for node in {p for p in tree.parents if p >= 0}:
            q_rows[node] = self.side.full_vocab(proposal.dists[tree.cand[node]].exp()).to(self.engine.tdev)
            self.nbytes += tensor_bytes(q_rows[node])
        return q_rows

    def verify(self, proposal: Proposal) -> tuple[torch.Tensor, list[int], int]:
        """Send the proposal to the target, verify it in one forward, keep the accepted path in the target's
        cache; returns the verified features, the accepted path (tree nodes, root first) and the bonus token."""
        eng, tc, tree = self.engine, self.tc, proposal.tree
        with self.clock("transfer"):
            ids = torch.tensor(tree.tokens, device=eng.tdev)
            self.nbytes += 2 * tensor_bytes(ids)  # the token ids and their parents (as many int64s)
            q_rows = self._q_rows(proposal, ids)
        with self.clock("verify"):
            L, N1 = tc.length, len(tree.tokens)
            pos = (L + torch.tensor(tree.depths, device=eng.tdev))[None]
            mask = torch.cat([torch.ones(N1, L, dtype=torch.bool, device=eng.tdev), tree.mask(eng.tdev)], 1)
            h = eng.t_forward(ids[None], positions=pos, mask=mask[None, None], cache=tc, start=L)[0]  # (N+1, D)
            logits = eng.target.model.logits(h)
            if self.sampling:
                p = probs(logits, self.cfg.temperature, self.cfg.top_p)
                path, bonus = sample_accept(tree, p, q_rows, self.tgen)
            else:
                path, bonus = greedy_accept(tree, logits)
            tc.commit([L + i for i in path], start=L)
        return h, path, bonus

    def accept(self, proposal: Proposal, path: list[int], bonus: int) -> list[int]:
        """Count the step; returns its new tokens (the accepted ones and the bonus, cut at EOS or the limit)."""
        self.forwards += 1
        self.accept_lengths.append(len(path) - 1)
        if proposal.looked:
            self.lookups += 1
            self.lookup_accepted += len(set(path) & set(proposal.look_nodes))
        for d in range(len(path) - 1):
            self.per_depth[d] += 1
        tokens = [proposal.tree.tokens[i] for i in path[1:]] + [bonus]
        new, self.stop = finish(tokens, self.engine.target.eos_ids, self.cfg.max_new_tokens - len(self.out))
        self.out += new
        return new

    def commit(self, new: list[int], h: torch.Tensor, path: list[int]) -> None:
        """The accepted tokens and their true features go back to the draft (and the lookup index)."""
        if self.index is not None:
            self.index.extend(new)
        if self.stop or self.side is None:
            return
        with self.clock("transfer"):
            feats, ids = self._to_draft(h[path], new)
        with self.clock("draft"):
            self.pred = self.side.commit(feats, ids, self.side.cache.length)

    def result(self) -> GenerationResult:
        sync(self.engine.tdev, self.engine.ddev)
        decode_s = time.perf_counter() - self.t_decode
        s = self.clock.s
        return GenerationResult.of(
            self.out,
            self.forwards,
            decode_s,
            accept_lengths=self.accept_lengths,
            accepted_per_depth=self.per_depth,
            prefill_s=s["prefill"],
            draft_s=s["draft"],
            verify_s=s["verify"],
            transfer_s=s["transfer"],
            other_s=max(decode_s - s["draft"] - s["verify"] - s["transfer"], 0.0),
            transfer_bytes=self.nbytes,
            lookup_forwards=self.lookups,
            lookup_accepted=self.lookup_accepted,
        )
