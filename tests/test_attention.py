"""`split_attention`: the masked attention for any cache layout, and bitwise the same numbers for a token
verified in a tree as for the same token decoded alone (bf16)."""

from __future__ import annotations

import pytest
import torch
from conftest import num_threads, target_spec
from helpers.trees import PARENTS, ancestry

from dovetail_infer.kv_cache import KVCache
from dovetail_infer.models.attention import TAIL, split_attention, split_mask
from dovetail_infer.models.target import load_target


def reference(q, k, v, mask):
    """Plain masked softmax attention in float64 (grouped KV heads repeated)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1).double(), v.repeat_interleave(G, 1).double()
    s = (q.double() @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("start", [3, 40, 200])
def test_split_attention_is_the_masked_attention_for_any_layout(start):
    g = torch.Generator().manual_seed(start)
    depth, seen = ancestry(PARENTS)
    T, S, H, Hk, d = len(PARENTS), start + len(PARENTS), 6, 2, 16
    q, k, v = (
        torch.randn(2, H, T, d, generator=g),
        torch.randn(2, Hk, S, d, generator=g),
        torch.randn(2, Hk, S, d, generator=g),
    )
    mask = torch.cat([torch.ones(T, start, dtype=torch.bool), seen], 1)
    mask[3, 1] = False  # a hidden prefix slot, and a visible slot at an unexpected position: still summed once
    mask[5, start + 4] = True
    positions = torch.tensor([start + x for x in depth])[None].expand(2, T)
    out = split_attention(q, k, v, split_mask(positions, mask[None, None], start, T))
    torch.testing.assert_close(out.double(), reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    per_row = torch.stack([positions[0], positions[0] + 1])  # batch rows with their own positions
    out = split_attention(q, k, v, split_mask(per_row, mask[None, None].expand(2, 1, T, S), start, T))
    torch.testing.assert_close(out.double(), reference(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_one_token_fast_path_equals_the_general_split():
    g = torch.Generator().manual_seed(0)
    for start in (TAIL - 1, 100):
        q, k, v = (
            torch.randn(1, 9, 1, 64, generator=g).bfloat16(),
            *torch.randn(2, 1, 3, start + 1, 64, generator=g).bfloat16(),
        )
        fast = split_attention(q, k, v, split_mask(None, None, start, 1))
        general = split_attention(q, k, v, split_mask(torch.tensor([[start]]), None, start, 1))
        assert torch.equal(fast, general)


@torch.no_grad()
def test_tree_verification_is_bitwise_one_token_decoding():
    """bf16: the hidden state of every tree node from one verification forward equals, bit for bit, the one
    its path gets decoded a token at a time. With attention summed by cache slot this failed for 4 of
    128 nodes here (and 2 of 54 on SmolLM2): a node sees its ancestors across its siblings' slots."""
    rc = dict(vocab_size=49152, hidden_size=256, n_layers=4, n_heads=4, n_kv_heads=1, intermediate_size=256)
    model = load_target(target_spec("tiny_random", dtype="bfloat16", random_config=rc)).model
    depth, seen = ancestry(PARENTS)
    T, differ = len(PARENTS), []
    with num_threads(2):
        for trial in range(8):
            g = torch.Generator().manual_seed(trial)
            P = 200 + 13 * trial
            prefix, toks = torch.randint(0, 49152, (1, P), generator=g), torch.randint(0, 49152, (T,), generator=g)
            cache = KVCache.for_model(model.config, 512, dtype=torch.bfloat16)
            model(prefix, cache=cache, start=0)
            mask = torch.cat([torch.ones(T, P, dtype=torch.bool), seen], 1)[None, None]
            tree = model(toks[None], torch.tensor([[P + x for x in depth]]), mask, cache, P)[0]
            for i in range(T):
                path = seen[i].nonzero().flatten().tolist()
                for n, node in enumerate(path):  # overwrites the tree's slots: the prefix stays
                    h = model(toks[node].view(1, 1), cache=cache, start=P + n)[0, 0]
                differ += [] if torch.equal(h, tree[i]) else [(trial, i)]
    assert differ == []


def test_a_query_gets_the_same_bits_whatever_the_cache_length():
    """bf16: a token decoded alone (its keys are the whole cache) and the same token verified in a tree (the cache
    runs on past its keys: siblings, later nodes, scratch) get bitwise the same attention. One GEMM over the
    whole cache rounded differently for some lengths (mt_bench 84 parted from one-token decoding that way)."""
    g = torch.Generator().manual_seed(0)
    Hk, G, d, differ, tried = 3, 3, 64, [], 0
    with num_threads(2):
        for n in list(range(TAIL, TAIL + 70)) + [200, 333, 517]:  # the query's own keys: positions 0..n-1
            k, v = (torch.randn(1, Hk, n + 100, d, generator=g).bfloat16() for _ in range(2))
            q = torch.randn(1, Hk * G, 1, d, generator=g).bfloat16()
            alone = split_attention(q, k[:, :, :n], v[:, :, :n], split_mask(None, None, n - 1, 1))
            for extra in (1, 7, 16, 29, 60, 100):  # a tree: the query sits at slot n-1, other nodes after it
                S = n + extra
                mask = torch.zeros(1, 1, extra + 1, S, dtype=torch.bool)
                mask[..., :n] = True
                mask[0, 0, 1:, n:].fill_diagonal_(True)  # the other nodes see themselves (not the query)
                pos = torch.tensor([[n - 1] + [n + 3] * extra])
                qs = torch.cat([q, torch.randn(1, Hk * G, extra, d, generator=g).bfloat16()], 2)
                tree = split_attention(qs, k[:, :, :S], v[:, :, :S], split_mask(pos, mask, n - 1, extra + 1))
                tried += 1
                differ += [] if torch.equal(alone[:, :, 0], tree[:, :, 0]) else [(n, extra)]
    assert tried == 438 and differ == []
