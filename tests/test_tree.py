"""Draft tree construction: masks, paths, best-first selection and level-by-level growth."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dovetail_infer.tree import build_tree, grow_tree, select_best, tree_depths, tree_mask, tree_paths


@st.composite
def parent_lists(draw, max_nodes: int = 24) -> list[int]:
    """Random trees in parents-first order: node i's parent is any earlier node."""
    n = draw(st.integers(0, max_nodes))
    return [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n + 1)]


def ancestors(parents: list[int], i: int) -> set[int]:
    out = set()
    while parents[i] >= 0:
        i = parents[i]
        out.add(i)
    return out


@given(parent_lists())
def test_mask_is_self_plus_ancestors(parents):
    mask = tree_mask(parents)
    for i in range(len(parents)):
        assert {j for j in range(len(parents)) if mask[i, j]} == ancestors(parents, i) | {i}


@given(parent_lists())
def test_paths_and_depths(parents):
    depths = tree_depths(parents)
    paths = tree_paths(parents)
    leaves = [i for i in range(len(parents)) if i not in set(parents)]
    assert [p[-1] for p in paths] == leaves
    for p in paths:
        assert p[0] == 0 and all(parents[b] == a for a, b in zip(p, p[1:]))
        assert [depths[i] for i in p] == list(range(len(p)))
    assert set().union(*map(set, paths)) == set(range(len(parents)))


def random_candidates(draw, n_levels: int, k: int) -> tuple[list[int], list[float]]:
    """A candidate forest like growth makes it: each candidate has up to k children with decreasing
    cumulative scores (log-probs are <= 0, siblings come sorted)."""
    parents, scores, level = [], [], [-1]
    for _ in range(n_levels):
        nxt = []
        for p in level:
            base = 0.0 if p < 0 else scores[p]
            incs = sorted(draw(st.lists(st.floats(-5, 0), min_size=1, max_size=k)), reverse=True)
            for inc in incs:
                parents.append(p)
                scores.append(base + inc)
                nxt.append(len(parents) - 1)
        level = nxt[:k]
    return parents, scores


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 20), st.integers(1, 4), st.integers(1, 4))
def test_selection_is_budgeted_ancestor_closed_and_best(data, budget, levels, k):
    parents, scores = random_candidates(data.draw, levels, k)
    chosen = select_best(parents, scores, budget)
    assert len(chosen) == min(budget, len(parents))
    seen = set()
    for c in chosen:  # a parent is always chosen before its child
        assert parents[c] == -1 or parents[c] in seen
        seen.add(c)
    # with non-increasing scores along paths, best-first is the global top-`budget`
    assert sorted(scores[c] for c in chosen)[0] >= sorted(scores, reverse=True)[len(chosen) - 1] - 1e-12
    # each sibling list is a prefix of the candidate order
    for p in set(parents):
        sibs = [c for c, q in enumerate(parents) if q == p]
        kept = [c for c in sibs if c in seen]
        assert kept == sibs[: len(kept)]
    tree = build_tree(0, list(range(len(parents))), parents, scores, budget)
    assert tree.size == len(chosen) and all(tree.parents[i] < i for i in range(1, len(tree.tokens)))


def fake_expand(vocab: int, seed: int):
    """An expand callback with random log-distributions, recording the calls."""
    gen = torch.Generator().manual_seed(seed)
    calls = []

    def expand(parent_rows, tokens, depth):
        calls.append((list(parent_rows), list(tokens), depth))
        return torch.log_softmax(torch.randn(len(tokens), vocab, generator=gen) * 3, -1)

    return expand, calls


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 20), st.integers(1, 6), st.integers(1, 4), st.integers(0, 10_000))
def test_grow_respects_budget_depth_and_frontier(budget, depth, k, seed):
    vocab = 16
    expand, calls = fake_expand(vocab, seed)
    root_lq = torch.log_softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(seed + 1)) * 3, -1)
    tree, dists = grow_tree(7, root_lq, expand, budget, depth, k)
    assert tree.tokens[0] == 7 and tree.size == min(budget, k + (depth - 1) * k * k)
    assert tree.size <= budget and max(tree.depths) <= depth
    assert len(calls) == depth - 1 and all(len(t) <= k for _, t, _ in calls)
    assert [d for _, _, d in calls] == list(range(1, depth))
    mask = tree.mask()
    assert all(mask[i].sum() == tree.depths[i] + 1 for i in range(len(tree.tokens)))
    # every node with children was expanded, so its draft distribution is known
    for node in set(tree.parents) - {-1}:
        assert tree.cand[node] in dists
    # children of a node are that node's top tokens, in order
    for node, kids in enumerate(tree.children()):
        if kids:
            lq = dists[tree.cand[node]]
            assert [tree.tokens[c] for c in kids] == lq.topk(len(kids)).indices.tolist()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(1, 8), st.integers(0, 1000))
def test_top_k_one_is_a_chain(budget, depth, seed):
    expand, _ = fake_expand(16, seed)
    root_lq = torch.log_softmax(torch.randn(16), -1)
    tree, _ = grow_tree(0, root_lq, expand, budget, depth, 1)
    assert tree.parents == [-1] + list(range(min(budget, depth)))


def test_greedy_tree_example():
    """budget 3, k 2: root children a (-0.1), b (-1); a's children c (-0.2), d (-3) -> keep a, c, b."""
    root_lq = torch.full((5,), -50.0)
    root_lq[1], root_lq[2] = -0.1, -1.0

    def expand(parent_rows, tokens, depth):
        out = torch.full((len(tokens), 5), -50.0)
        out[:, 3], out[:, 4] = -0.1, -3.0
        return out

    tree, _ = grow_tree(0, root_lq, expand, 3, 2, 2)
    assert tree.tokens == [0, 1, 3, 2] and tree.parents == [-1, 0, 1, 0] and tree.depths == [0, 1, 2, 1]
    assert tree.paths() == [[0, 1, 2], [0, 3]]
