"""The target's (and the draft's) decode / verify forward under torch.compile, with static shapes.

Eager PyTorch spends most of a CPU decoding step on per-op overhead (~35 small ops per layer, each
10-20 us), not on reading weights. Inductor fuses the element-wise work (RMSNorm, RoPE, SiLU, masks)
into a few C++ loops. It needs static shapes to do that well (its dynamic-shape build failed here), so
every call is padded to a bucket of new tokens (1, 2, 3, 4, 5, 9, 17, 33) and attends over the whole cache
buffer under a mask: one compiled graph per (bucket, cache size), shared by plain decoding (bucket 1) and tree verification.

Padding rows write scratch cache slots past the new tokens and see only themselves; their outputs are
dropped. Prefill (more new tokens than the largest bucket) runs eagerly.

Every bucket's graph is batch-invariant: a token verified among others (in a chain or a tree) gets bitwise the
hidden state it gets decoded alone, so greedy drafts reproduce one-token decoding exactly in bf16 and int4 too.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref

import torch
import torch._inductor.config as inductor_config

from dovetail_infer.kv_cache import KVCache
from dovetail_infer.models.attention import causal_mask

log = logging.getLogger(__name__)

# 2^k + 1: a budget-b tree verifies b + 1 tokens (root included); padding 9 to 16 cost 37% more (measured).
# 4: the int4 kernel's cost doubles past 4 rows (4 -> 5: ~8 -> ~14 ms of products), so short chains stop at 4
BUCKETS = (1, 2, 3, 4, 5, 9, 17, 33)

# "max-autotune": inductor benchmarks its own C++ GEMM template for each weight product and keeps the
# fastest blocking. SmolLM2 bf16, 1 new token: 12.8 vs 19.4 ms per forward (3 tokens: 16.0 vs 18.7), but
# ~80 s of compiling per bucket instead of ~40. Only the C++ template is allowed: letting it race oneDNN
# picks different kernels for different bucket sizes, and a token verified among others then rounds
# differently from the same token decoded alone (measured); the template alone keeps every row's sum order.
# cpp_wrapper: the graph's kernels are called from generated C++ instead of a Python wrapper; no change for
# bf16 / int4 targets, ~6% per step for int4a8, whose VNNI kernel is an op the wrapper calls 120 times a step.
MODES = {
    "default": {},
    "max-autotune": {"max_autotune": True, "max_autotune_gemm_backends": "CPP", "cpp_wrapper": True},
}


def _raise_recompile_limit(n: int) -> None:
    """Every CompiledForward shares one code object (`_static`), so its graphs for all models, buckets and
    cache sizes count against one per-code limit (40 here was hit by a benchmark with four models)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < n:  # names differ across torch versions
            setattr(cfg, name, n)


class CompiledForward:
    """Drop-in for `forward(*inputs, positions, mask, cache, start)` on a static cache: `LlamaModel`
    (inputs: token ids (1, T)) or `DraftModel` (inputs: features and embeddings (1, T, D))."""

    def __init__(
        self,
        model: torch.nn.Module,
        buckets: tuple[int, ...] = BUCKETS,
        skip_guards: bool = True,
        mode: str = "default",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"compile mode must be one of {sorted(MODES)}, got {mode!r}")
        self.model, self.buckets, self.skip_guards, self.mode = model, tuple(sorted(buckets)), skip_guards, mode
        # every cache size is another graph per bucket: a smaller cache after a long prompt pays off at ~40 s of
        # compiling per graph, not at max-autotune's ~80 s of tuning each (six bench prompts: an hour in one pass)
        self.refit_cache = mode != "max-autotune"
        _raise_recompile_limit(1024)
        # options: a backend of its own, so graphs of different modes are never mixed up in dynamo's cache
        self._fn = torch.compile(self._static, dynamic=False, options=MODES[mode] or None)
        self.compile_s = 0.0
        self._seen: set[tuple[int, int]] = set()

    def _static(self, inputs, positions, mask, cache, start):
        return self.model(*inputs, positions, mask, cache, start)

    def _stance(self, key: tuple[int, int]):
        """A graph already built for this (bucket, cache size): check only the guards that tell the built
        graphs apart (dynamo's full guard check costs ~1 ms per call here, ~10% of an int4 step)."""
        if self.skip_guards and key in self._seen:
            return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        return contextlib.nullcontext()

    def _run(self, args: tuple, key: tuple[int, int]) -> torch.Tensor:
        # freezing: weights become constants (needed to lower the prepacked oneDNN linears; compile-time only).
        # emulate_precision_casts: round to bf16 between fused ops where eager does. Without it a fused kernel
        # keeps some intermediates in fp32 depending on the bucket's fusion choices, so the same token got a
        # different hidden state alone than among 5 (from layer 4 of 30 on, SmolLM2 int4) and greedy
        # speculative decoding drifted from one-token decoding at near-ties.
        with inductor_config.patch(freezing=True, emulate_precision_casts=True), self._stance(key):
            return self._fn(*args)

    def bucket(self, t: int) -> int | None:
        return next((b for b in self.buckets if b >= t), None)

    def __call__(
        self,
        *inputs: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        B, T = inputs[0].shape[:2]
        tb = self.bucket(T)
        if cache is None or B != 1 or tb is None or start + tb > cache.max_len:
            return self.model(*inputs, positions, mask, cache, start)
        dev, L = inputs[0].device, cache.max_len
        padded = []
        for x in inputs:
            p = x.new_zeros(1, tb, *x.shape[2:])
            p[:, :T] = x
            padded.append(p)
        pos = torch.arange(start, start + tb, device=dev)[None]
        if positions is not None:
            pos[:, :T] = positions
        full = torch.zeros(1, 1, tb, L, dtype=torch.bool, device=dev)
        if mask is None:  # causal over the prefix and the new tokens
            mask = causal_mask(T, start, dev)
        full[:, :, :T, : start + T] = mask
        pad = torch.arange(T, tb, device=dev)
        full[0, 0, pad, start + pad] = True  # padding rows see only themselves
        key = (tb, L)
        t0 = time.perf_counter()
        args = (tuple(padded), pos, full, cache, torch.tensor(start, device=dev))
        try:
            h = self._run(args, key)
        except RuntimeError as e:  # the graph was not built after all (e.g. dynamo gave up): check every guard
            if "skip_guard_eval_unsafe" not in str(e):
                raise
            log.warning("compiled %s step: full guard checks from now on (%s)", type(self.model).__name__, e)
            self.skip_guards = False
            h = self._run(args, key)
        if key not in self._seen:
            self._seen.add(key)
            self.compile_s += time.perf_counter() - t0
            log.info("compiled the %s step for %d new tokens over a %d-slot cache", type(self.model).__name__, tb, L)
        return h[:, :T]

    def warmup(self, cache: KVCache, sizes: tuple[int, ...] | None = None, example: tuple = ()) -> float:
        """Compile every bucket up to max(sizes) for this cache (it must hold nothing yet: slots from 0 are
        written). `example`: one (1, 1, ...) tensor per input (default: token ids). Returns seconds spent."""
        top = self.bucket(max(sizes)) if sizes else self.buckets[-1]
        t0 = time.perf_counter()
        dev = cache.k[0].device
        with torch.no_grad():
            for tb in self.buckets:
                if (top is not None and tb > top) or tb > cache.max_len:
                    break
                if (tb, cache.max_len) in self._seen:
                    continue
                xs = [x.expand(1, tb, *x.shape[2:]) for x in example] or [
                    torch.zeros(1, tb, dtype=torch.long, device=dev)
                ]
                self(*xs, cache=cache, start=0)
        return time.perf_counter() - t0


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_forward(model: torch.nn.Module, mode: str = "default") -> CompiledForward:
    """One CompiledForward per model and mode, so engines built on the same target (a sweep) share its graphs."""
    per_model = _SHARED.setdefault(model, {})
    if mode not in per_model:
        per_model[mode] = CompiledForward(model, mode=mode)
    return per_model[mode]


def compile_mode(compile: bool | str | None) -> str | None:
    """`infer.compile` -> a mode: false/None -> None (eager), true -> "default", or a name in MODES."""
    if compile is None or compile is False or compile in ("false", "False", "none"):
        return None
    mode = "default" if compile is True or compile in ("true", "True") else str(compile)
    if mode not in MODES:
        raise ValueError(f"infer.compile must be false, true or one of {sorted(MODES)}, got {compile!r}")
    return mode
