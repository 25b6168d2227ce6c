"""Prompt lookup: the n-gram index, and lossless decoding when looked-up chains replace draft trees."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers.engine import hf_greedy, prompt, random_draft

from dovetail_infer import engine
from dovetail_infer.engine import Dovetail, InferConfig
from dovetail_infer.lookup import NGramIndex
from dovetail_infer.tree import DraftTree, graft_chain, grow_tree, tree_depths

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_propose(ids: list[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """The definition, by scanning: longest suffix n-gram first, its latest earlier occurrence."""
    L = len(ids)
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        for i in range(L - n - 1, -1, -1):  # occurrence ids[i:i+n] followed by a token, latest first
            if ids[i : i + n] == ids[L - n :]:
                return ids[i + n : i + n + k]
    return []


def test_proposes_what_followed_the_latest_earlier_occurrence():
    ix = NGramIndex([5, 1, 2, 3, 9, 1, 2, 4, 7, 1, 2], max_ngram=3, min_ngram=2)
    assert ix.propose(3) == [4, 7, 1]  # (1, 2) last followed by 4; not by 3 (older)
    ix.extend([4])
    assert ix.propose(8) == [7, 1, 2, 4]  # (1, 2, 4) seen once; stops at the end of the sequence
    ix.extend([8])
    assert ix.propose(4) == []  # (4, 8) and (2, 4, 8) never seen before


@pytest.mark.parametrize("max_ngram,min_ngram", [(3, 2), (2, 1), (4, 4)])
def test_index_agrees_with_a_brute_force_scan(max_ngram, min_ngram):
    gen = torch.Generator().manual_seed(max_ngram * 10 + min_ngram)
    seq = torch.randint(0, 4, (300,), generator=gen).tolist()  # 4 symbols: many repeats
    ix = NGramIndex(seq[:5], max_ngram, min_ngram)
    for j in range(5, len(seq)):
        for k in (1, 3, 6):
            assert ix.propose(k) == brute_propose(seq[:j], k, max_ngram, min_ngram), (j, k)
        ix.extend(seq[j : j + 1])


def test_bad_ngram_sizes_are_refused():
    with pytest.raises(ValueError, match="min_ngram"):
        NGramIndex([], max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError, match="InferConfig.lookup"):
        InferConfig(lookup=-1)
    with pytest.raises(ValueError, match="InferConfig.lookup"):
        InferConfig(lookup=True)


def test_chain_tree():
    t = DraftTree.chain(7, [3, 4, 5])
    assert (t.tokens, t.parents, t.depths, t.cand, t.size) == ([7, 3, 4, 5], [-1, 0, 1, 2], [0, 1, 2, 3], [-1] * 4, 3)
    assert t.paths() == [[0, 1, 2, 3]]


def test_graft_shares_the_draft_s_nodes_and_cuts_its_worst_to_fit():
    # root 7; draft: 3 (best), 5, then 4 below 3 — selection order, parents first
    tree = DraftTree([7, 3, 5, 4], [-1, 0, 0, 1], [0, 1, 1, 2], [-1, 0, 1, 2])
    t, nodes = graft_chain(tree, [3, 4, 6], cap=5)
    assert (t.tokens, t.parents, t.cand, nodes) == ([7, 3, 5, 4, 6], [-1, 0, 0, 1, 3], [-1, 0, 1, 2, -1], [1, 3, 4])
    t, nodes = graft_chain(tree, [3, 4, 6], cap=3)  # 3 shared + 2 new must fit: only the draft's best node stays
    assert (t.tokens, t.parents, t.depths, nodes) == ([7, 3, 4, 6], [-1, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3])
    t, nodes = graft_chain(tree, [9, 9, 9, 9], cap=2)  # a chain longer than the cap is cut
    assert (t.tokens, t.parents, nodes) == ([7, 9, 9], [-1, 0, 1], [1, 2])


@pytest.mark.parametrize("seed", range(20))
def test_graft_keeps_a_tree_within_the_cap_with_the_chain_as_a_path(seed):
    gen = torch.Generator().manual_seed(seed)

    def expand(rows, tokens, depth):
        return torch.randn(len(tokens), 5, generator=gen).log_softmax(-1)

    tree, _ = grow_tree(0, torch.randn(5, generator=gen).log_softmax(-1), expand, budget=8, depth=4, top_k=3)
    chain = torch.randint(0, 5, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
    cap = max(8, len(chain)) - seed % 3
    t, nodes = graft_chain(tree, chain, cap)
    assert t.size <= cap and all(t.parents[i] < i for i in range(1, len(t.tokens)))
    assert t.depths == tree_depths(t.parents)
    keep = sum(c >= 0 for c in t.cand)  # the draft's nodes kept: a prefix of its tree
    assert t.tokens[: keep + 1] == tree.tokens[: keep + 1] and t.parents[: keep + 1] == tree.parents[: keep + 1]
    assert [t.tokens[i] for i in nodes] == chain[:cap] and [t.parents[i] for i in nodes] == [0, *nodes[:-1]]
    kids = t.children()
    assert all(len({t.tokens[c] for c in k}) == len(k) for k in kids)  # no duplicate siblings
    assert keep == min(tree.size, cap) or t.size == cap  # draft nodes are cut only to make room


def test_graft_is_greedy_only():
    with pytest.raises(ValueError, match="greedy only"):
        InferConfig(lookup=3, lookup_graft=True, temperature=0.7)
    with pytest.raises(ValueError, match="lookup_graft"):
        InferConfig(lookup_graft=1)


class CheatIndex(NGramIndex):
    """Knows the target's greedy continuation: proposes it with every 3rd proposal cut short by a wrong token,
    and every 4th step nothing (the draft, when there is one, proposes then)."""

    def __init__(self, full: list[int]) -> None:
        super().__init__()
        self.full, self.calls = full, 0

    def propose(self, k: int) -> list[int]:
        self.calls += 1
        if self.calls % 4 == 0:
            return []
        L = len(self.ids)
        out = self.full[L : L + k]
        if self.calls % 3 == 0 and len(out) > 1:
            out[len(out) // 2] = (out[len(out) // 2] + 1) % 7  # wrong from here on: partial acceptance
        return out


def cheat_index(full: list[int], seq: list[int]) -> CheatIndex:
    ix = CheatIndex(full)
    ix.extend(seq)
    return ix


@pytest.mark.parametrize(
    "with_draft,graft", [(False, False), (True, False), (True, True)], ids=["target-only", "draft", "graft"]
)
@pytest.mark.parametrize("lookup", [1, 4])
def test_greedy_with_lookup_equals_hf(tiny_target, monkeypatch, with_draft, graft, lookup):
    """Looked-up chains (accepted whole, in part, or not at all) alternate with draft steps, or are grafted onto
    the draft's trees; the output is the target's, and the draft stays in sync (it commits every accepted token
    with its true feature)."""
    n = 40
    draft = random_draft(tiny_target) if with_draft else None
    eng = Dovetail(tiny_target, draft, "cpu")
    for i in range(3):
        ids = prompt(tiny_target, i)
        ref = hf_greedy(tiny_target, ids, n)
        cfg = InferConfig(budget=4, depth=3, top_k=2, max_new_tokens=n, lookup=lookup, lookup_graft=graft)
        plain = eng.generate(ids, cfg)
        assert plain.output_ids == ref  # the real n-gram index
        monkeypatch.setattr(engine, "NGramIndex", functools.partial(cheat_index, ids + ref))
        r = eng.generate(ids, cfg)
        monkeypatch.undo()
        assert r.output_ids == ref
        assert 0 < r.lookup_forwards < r.forwards and r.lookup_accepted > r.lookup_forwards * (lookup - 1) / 2
        assert r.tau > plain.tau
        assert eng.generate(ids, InferConfig(budget=4, depth=3, top_k=2, max_new_tokens=n)).lookup_forwards == 0
