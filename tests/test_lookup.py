"""Prompt lookup: the n-gram index, and lossless decoding when looked-up chains replace draft trees."""

from __future__ import annotations

import functools

import pytest
import torch
from test_engine import hf_greedy, prompt, random_draft

from dovetail_infer import engine
from dovetail_infer.engine import Dovetail, InferConfig
from dovetail_infer.lookup import NGramIndex
from dovetail_infer.tree import DraftTree

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


@pytest.mark.parametrize("with_draft", [False, True], ids=["target-only", "draft"])
@pytest.mark.parametrize("lookup", [1, 4])
def test_greedy_with_lookup_equals_hf(tiny_target, monkeypatch, with_draft, lookup):
    """Looked-up chains (accepted whole, in part, or not at all) alternate with draft steps; the output is the
    target's, and the draft stays in sync (it commits every accepted token with its true feature)."""
    n = 40
    draft = random_draft(tiny_target) if with_draft else None
    eng = Dovetail(tiny_target, draft, "cpu")
    for i in range(3):
        ids = prompt(tiny_target, i)
        ref = hf_greedy(tiny_target, ids, n)
        plain = eng.generate(ids, InferConfig(budget=4, depth=3, top_k=2, max_new_tokens=n, lookup=lookup))
        assert plain.output_ids == ref  # the real n-gram index
        monkeypatch.setattr(engine, "NGramIndex", functools.partial(cheat_index, ids + ref))
        r = eng.generate(ids, InferConfig(budget=4, depth=3, top_k=2, max_new_tokens=n, lookup=lookup))
        monkeypatch.undo()
        assert r.output_ids == ref
        assert 0 < r.lookup_forwards < r.forwards and r.lookup_accepted > r.lookup_forwards * (lookup - 1) / 2
        assert r.tau > plain.tau
        assert eng.generate(ids, InferConfig(budget=4, depth=3, top_k=2, max_new_tokens=n)).lookup_forwards == 0
