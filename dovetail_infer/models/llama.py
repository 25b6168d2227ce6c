"""One Llama implementation for three uses: target verification, draft layers, draft training.

gpt-fast style: a config dataclass and a few small modules. Attention takes an explicit boolean
mask and an optional static KV cache (`dovetail_infer.kv_cache.KVCache`), so the same block verifies
a token tree, decodes a single token, or trains causally over a whole sequence.

Shapes: B batch, T new tokens, S attended length, D hidden, H heads, Hk KV heads, d head dim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dovetail_infer import kernels
from dovetail_infer.kv_cache import round_up


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    intermediate_size: int = 11008
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_hf(cls, hf: Any) -> LlamaConfig:
        """Build from a transformers `LlamaConfig` (or a dict of its fields)."""
        get = hf.get if isinstance(hf, dict) else lambda k, d=None: getattr(hf, k, d)
        n_heads = get("num_attention_heads")
        rope_params = get("rope_parameters") or {}
        theta = get("rope_theta") or rope_params.get("rope_theta") or 10000.0
        scaling = get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default" else None)
        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            n_layers=get("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=get("num_key_value_heads") or n_heads,
            intermediate_size=get("intermediate_size"),
            head_dim=get("head_dim") or get("hidden_size") // n_heads,
            rope_theta=float(theta),
            rope_scaling=dict(scaling) if scaling else None,
            rms_norm_eps=get("rms_norm_eps") or 1e-5,
            max_position_embeddings=get("max_position_embeddings") or 4096,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like HF Llama, then cast back before the weight.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies, with Llama-3 style scaling when the config asks for it."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind not in (None, "default"):
        raise NotImplementedError(f"rope_scaling type {kind!r} is not supported")
    return inv.float()


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> cos, sin (B, 1, T, d) in the model dtype."""
    ang = positions.float()[..., None] * inv_freq.to(positions.device)  # (B, T, d/2)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype)[:, None], ang.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # q, k and v in one matrix: one GEMV instead of three per decoding step (measured 1.6x faster)
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _fuse(state_dict, prefix, "qkv_proj", ("q_proj", "k_proj", "v_proj"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x, cos, sin, mask=None, cache=None, layer: int = 0, start: int = 0):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], -1)
        q = q.reshape(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, d)
        k = k.reshape(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hk, T, d)
        v = v.reshape(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # (B, Hk, start+T, d): the cached prefix plus the new keys (split: up to a BLOCK boundary, see there)
            k, v = cache.update(layer, start, k, v, BLOCK if isinstance(mask, SplitMask) else 1)
        if isinstance(mask, SplitMask):  # decoding / verification: a few queries over a long cache
            y = split_attention(q, k, v, mask)
        elif cache is not None and T <= SMALL_QUERY:  # the same, summed by slot (the draft: cheaper, not exact)
            y = small_query_attention(q, k, v, mask)
        else:
            causal = mask is None and cache is None
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv != self.n_heads
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


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


def _fuse(state_dict: dict, prefix: str, fused: str, parts: tuple[str, ...]) -> None:
    """Load checkpoints with separate projections (HF's layout) into one fused matrix."""
    keys = [f"{prefix}{p}.weight" for p in parts]
    if all(k in state_dict for k in keys):
        state_dict[f"{prefix}{fused}.weight"] = torch.cat([state_dict.pop(k) for k in keys], 0)


def unfuse_state_dict(sd: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our fused layout back to HF's separate q/k/v and gate/up projections."""
    out = {}
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for k, v in sd.items():
        if k.endswith("qkv_proj.weight"):
            base = k[: -len("qkv_proj.weight")]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.split([q, kv, kv], 0)):
                out[f"{base}{name}.weight"] = part
        elif k.endswith("gate_up_proj.weight"):
            base = k[: -len("gate_up_proj.weight")]
            gate, up = v.chunk(2, 0)
            out[f"{base}gate_proj.weight"], out[f"{base}up_proj.weight"] = gate, up
        else:
            out[k] = v
    return out


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # fused: one GEMV
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _fuse(state_dict, prefix, "gate_up_proj", ("gate_proj", "up_proj"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """A Llama decoder layer; `input_norm=False` gives EAGLE's first draft layer (no input norm)."""

    def __init__(self, cfg: LlamaConfig, input_norm: bool = True) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if input_norm else nn.Identity()
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None, layer: int = 0, start: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Decoder-only Llama. `forward` returns the final-norm hidden states (the LM head's input)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache=None,
        start: int = 0,
    ) -> torch.Tensor:
        """input_ids (B, T); positions (B, T) RoPE positions (default start..start+T-1);
        mask (B|1, 1, T, start+T) bool, True = may attend (None: causal). Returns (B, T, D)."""
        x = run_blocks(self.layers, self.embed_tokens(input_ids), self.inv_freq, positions, mask, cache, start)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @classmethod
    def from_hf_state_dict(cls, cfg: LlamaConfig, sd: dict[str, torch.Tensor]) -> LlamaModel:
        """Load from a transformers LlamaForCausalLM state dict (keys `model.*`, `lm_head.weight`)."""
        with torch.device("meta"):
            model = cls(cfg)
        ours = {}
        for k, v in sd.items():
            if k.startswith("model."):
                ours[k[len("model.") :]] = v
            elif k == "lm_head.weight" and not cfg.tie_word_embeddings:
                ours[k] = v
        if cfg.tie_word_embeddings:
            ours.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(ours, strict=False, assign=True)
        missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(
                f"state dict does not match the Llama config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(cfg)
        return model


class PackedLinear(nn.Module):
    """A frozen nn.Linear whose weight is prepacked once for oneDNN (CPU inference).

    `F.linear` on a CPU reorders the weight into oneDNN's blocked layout on every call; for the few-row
    products of decoding and verification that costs as much as the product itself. Packing once
    halves the time of a decoding step (measured, bf16 and fp32) and gives bitwise the same results.
    `weight` stays (same state_dict keys; a tied LM head still shares the embedding).

    Batch invariance: in bf16, oneDNN computes a single row (M=1) with a kernel that splits long
    reductions (K > 1024 here: the down projection) differently from its multi-row kernel, so a token
    decoded alone and the same token verified among others could round apart and greedy speculative
    decoding would drift from one-token decoding at near-ties. A lone bf16 row therefore runs as a
    duplicated pair: every row then gets bitwise the result it gets among 2..33 rows (tested), at no
    measurable cost (bf16, 2 threads: 7.11 vs 7.18 ms of products per SmolLM2 forward, cache-hot).
    float32 keeps M=1 (there a pair costs 1.5x).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the packed kernel needs the weight's dtype (autocast, e.g. online features in bf16-mixed training,
        # would hand it another one); the frozen target then computes in its own dtype
        x = x.to(self.weight.dtype)
        rows = x.reshape(-1, x.shape[-1])
        single = rows.shape[0] == 1 and x.dtype != torch.float32
        if single:  # see `PackedLinear`: a lone bf16 row goes through the multi-row kernel, as a pair
            rows = rows.expand(2, -1).contiguous()
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        if single:
            y = y[:1]
        return y.reshape(*x.shape[:-1], y.shape[-1])


def can_pack(device: torch.device | str, dtype: torch.dtype) -> bool:
    return (
        torch.device(device).type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack_linears(module: nn.Module) -> nn.Module:
    """Swap every nn.Linear of a frozen CPU module for a PackedLinear (inference only, in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child))
        else:
            pack_linears(child)
    return module


class QuantLinear(nn.Module):
    """A frozen CPU linear with weight-only quantized weights: int8 (symmetric, one scale per output row)
    or int4 (asymmetric, a scale and a zero point per `group` inputs; GGUF's Q4_1 layout, so a Q4_1
    checkpoint re-quantizes almost exactly). Activations stay in the model dtype, except with `act8`
    (quant=int4a8): int4 weights times activations quantized to int8 per 32 inputs, on our VNNI kernel
    (`dovetail_infer.kernels`), llama.cpp's arithmetic for Q4_1.

    Decoding reads a quarter (int4) or half (int8) of the bf16 bytes: a SmolLM2 decoding step's matrix
    products fall from ~14 ms to ~5 ms (int4) here. The kernels scale badly with rows (int4: 5 rows cost
    ~3x one), so a quantized target verifies short drafts only. The quantized model *is* the target:
    lossless means equal to its own greedy decoding. `weight` stays (the draft's head copy, HF reference).
    """

    def __init__(self, linear: nn.Linear, bits: int, group: int = 32, act8: bool = False) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("QuantLinear: biased linears are not supported")
        self.weight, self.bits, self.group, self.act8 = linear.weight, bits, group, act8
        w = linear.weight.detach().float()
        N, K = w.shape
        self.out_features, self.in_features = N, K
        dtype = linear.weight.dtype
        if act8:  # int4 weights x int8 activations (llama.cpp's Q4_1 x Q8_1) on our AVX512-VNNI kernel
            if bits != 4 or group != kernels.GROUP:
                raise ValueError(f"QuantLinear: int8 activations need bits=4 and group={kernels.GROUP}")
            kernels.load_q4a8()
            qw, dm = kernels.pack_q4(w)
            self.register_buffer("qweight", qw)
            self.register_buffer("scales", dm)
        elif bits == 8:
            scale = (w.abs().amax(1) / 127).clamp(min=1e-10)
            self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
            self.register_buffer("scales", scale.to(dtype))
        elif bits == 4:
            if not quantizable(linear, 4, group):
                raise ValueError(f"int4 needs in_features % {group} == 0 and out_features % 16 == 0, got {N}x{K}")
            wg = w.reshape(N, K // group, group)
            lo, hi = wg.amin(-1), wg.amax(-1)
            scale = ((hi - lo) / 15).clamp(min=1e-10)
            q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(N, K)
            # the kernel dequantizes (q - 8) * scale + zero
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            self.register_buffer("scales", torch.stack([scale.t(), (lo + 8 * scale).t()], -1).to(dtype).contiguous())
        else:
            raise ValueError(f"QuantLinear: bits must be 4 or 8, got {bits}")

    @classmethod
    def from_quantized(
        cls, qweight: torch.Tensor, scales: torch.Tensor, bits: int, group: int, out_features: int, in_features: int
    ) -> QuantLinear:
        """A QuantLinear from its kernel buffers (`qweight`, `scales` as the constructor makes them), without
        a float weight: `weight` is None unless one is assigned (GGUF targets load this way, never in float)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.bits, self.group, self.act8 = bits, group, False
        self.out_features, self.in_features = out_features, in_features
        self.register_parameter("weight", None)
        if bits == 8 and qweight.data_ptr() % 64:  # a memory-mapped file's offset: the int8 kernel crashed at >= 4 rows
            qweight = qweight.clone()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        return self

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, (out, in) in the model dtype (tests and error reports)."""
        if self.act8:
            return kernels.unpack_q4(self.qweight, self.scales, *self.weight.shape).to(self.weight.dtype)
        eye = torch.eye(self.in_features, dtype=self.scales.dtype, device=self.scales.device)
        return self(eye).t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act8:
            return torch.ops.dovetail.q4a8_linear(
                x.to(self.weight.dtype), self.qweight, self.scales, self.weight.shape[0]
            )
        x2 = x.to(self.scales.dtype).reshape(-1, x.shape[-1]).contiguous()  # the scales are in the model dtype
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group, self.scales)
        return y.reshape(*x.shape[:-1], y.shape[-1])


# int4a8: int4 weights and int8 activations (dynamic, per 32 inputs), llama.cpp's Q4_1 x Q8_1 arithmetic
QUANT_BITS = {"int8": 8, "int4": 4, "int4a8": 4}


def quant_linear(linear: nn.Linear, quant: str, group: int = 32) -> QuantLinear:
    """A QuantLinear for a `quant` name (int8 / int4 / int4a8): the one place names map to kernels."""
    return QuantLinear(linear, QUANT_BITS[quant], group, act8=quant == "int4a8")


def quantizable(linear: nn.Linear, bits: int, group: int = 32) -> bool:
    N, K = linear.weight.shape
    return linear.bias is None and (bits == 8 or (K % group == 0 and N % 16 == 0))


def quantize_linears(module: nn.Module, quant: str, group: int = 32) -> int:
    """Swap every nn.Linear of a frozen CPU module for a QuantLinear (`quant`: int8 or int4), in place.
    Linears whose shape the kernel cannot take stay as they are. Returns how many were quantized."""
    if quant not in QUANT_BITS:
        raise ValueError(f"quant must be one of {sorted(QUANT_BITS)} (or null), got {quant!r}")
    bits, n = QUANT_BITS[quant], 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and quantizable(child, bits, group):
            setattr(module, name, quant_linear(child, quant, group))
            n += 1
        elif not isinstance(child, nn.Linear):
            n += quantize_linears(child, quant, group)
    return n


def run_blocks(
    layers: nn.ModuleList,
    x: torch.Tensor,
    inv_freq: torch.Tensor,
    positions: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    cache=None,
    start: int = 0,
    exact: bool = True,
) -> torch.Tensor:
    """The decoder stack shared by the target and the draft: default positions start..start+T-1, a causal
    mask over the cached prefix when a cache is used, RoPE once, then every block. x (B, T, D).
    `exact`: a few new tokens over a cache attend through `split_attention` (verification equals decoding)."""
    B, T, _ = x.shape
    if cache is not None and T <= SMALL_QUERY and exact:
        mask = split_mask(positions, mask, start, T)
    elif mask is None and cache is not None:
        mask = causal_mask(T, start, x.device)
    if positions is None:
        positions = torch.arange(start, start + T, device=x.device).expand(B, T)
    cos, sin = rope_cos_sin(inv_freq, positions, x.dtype)
    for i, layer in enumerate(layers):
        x = layer(x, cos, sin, mask, cache, i, start)
    return x


def causal_mask(T: int, start: int, device=None) -> torch.Tensor:
    """(1, 1, T, start+T) bool: the cached prefix is visible, new tokens see themselves causally."""
    q = torch.arange(T, device=device)[:, None] + start
    k = torch.arange(start + T, device=device)[None, :]
    return (k <= q)[None, None]
