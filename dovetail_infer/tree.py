"""EAGLE-2 style draft trees: grow level by level, keep the best `budget` nodes, build masks and paths.

A tree is a list of nodes in "parents first" order. Node 0 is the root: the last token the target
produced (it is verified together with the draft tokens but not counted in the budget). Nodes 1..N
are draft tokens. Growth works on *candidates* (every child the draft proposed); selection turns the
best of them into tree nodes.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# pick(log_q (F, V), k) -> (tokens (F, k), score increments (F, k)); siblings come in their order.
PickFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
# expand(parent_rows, tokens, depth) -> log q (F, V) of each new frontier node's children.
# parent_rows index the rows of the previous expand call (row 0 = the root before the first call).
ExpandFn = Callable[[list[int], list[int], int], torch.Tensor]


@dataclass
class DraftTree:
    tokens: list[int]  # (N+1,) token ids, tokens[0] is the root
    parents: list[int]  # (N+1,) parent node index, parents[0] = -1; parents[i] < i
    depths: list[int]  # (N+1,) depth, 0 for the root
    cand: list[int]  # (N+1,) candidate id of each node (-1 for the root): finds its draft distribution

    @property
    def size(self) -> int:
        """Draft tokens in the tree (the root excluded): what the budget counts."""
        return len(self.tokens) - 1

    def children(self) -> list[list[int]]:
        return tree_children(self.parents)

    def mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        return tree_mask(self.parents, device)

    def paths(self) -> list[list[int]]:
        return tree_paths(self.parents)

    @classmethod
    def root_only(cls, root: int) -> DraftTree:
        return cls([root], [-1], [0], [-1])

    @classmethod
    def chain(cls, root: int, tokens: Sequence[int]) -> DraftTree:
        """Root then `tokens`, each the only child of the one before (no draft distributions: cand -1)."""
        n = len(tokens)
        return cls([root, *map(int, tokens)], list(range(-1, n)), list(range(n + 1)), [-1] * (n + 1))


def tree_children(parents: Sequence[int]) -> list[list[int]]:
    """Children of every node, in node order (which is the sibling order)."""
    kids: list[list[int]] = [[] for _ in parents]
    for i, p in enumerate(parents):
        if p >= 0:
            kids[p].append(i)
    return kids


def tree_depths(parents: Sequence[int]) -> list[int]:
    depths = [0] * len(parents)
    for i, p in enumerate(parents):
        if p >= 0:
            depths[i] = depths[p] + 1
    return depths


def tree_mask(parents: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """(N+1, N+1) bool: node i attends to itself and its ancestors, nothing else. Needs parents[i] < i."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            if p >= i:
                raise ValueError(f"tree nodes must come after their parent: node {i} has parent {p}")
            mask[i] = mask[p]
        mask[i, i] = True
    return mask.to(device) if device is not None else mask


def tree_paths(parents: Sequence[int]) -> list[list[int]]:
    """Root-to-leaf node paths, one per leaf, leaves in node order."""
    kids = tree_children(parents)
    paths = []
    for leaf in (i for i, k in enumerate(kids) if not k):
        path = [leaf]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        paths.append(path[::-1])
    return paths


def select_best(parents: Sequence[int], scores: Sequence[float], budget: int) -> list[int]:
    """Up to `budget` candidates by score, best first from the root (parent -1): a candidate becomes
    eligible only once its parent is chosen, so the result is ancestor-closed even with ties. Ties go
    to the lower index, so siblings with non-increasing scores stay a prefix in their order.
    Candidates scored -inf are never chosen. Returns candidate ids in selection order."""
    kids: dict[int, list[int]] = {}
    for c, p in enumerate(parents):
        kids.setdefault(p, []).append(c)
    heap = [(-scores[c], c) for c in kids.get(-1, [])]
    heapq.heapify(heap)
    chosen: list[int] = []
    while heap and len(chosen) < budget:
        neg, c = heapq.heappop(heap)
        if neg == float("inf"):
            break  # everything left scores -inf
        chosen.append(c)
        for child in kids.get(c, []):
            heapq.heappush(heap, (-scores[child], child))
    return chosen


def build_tree(
    root: int, tokens: Sequence[int], parents: Sequence[int], scores: Sequence[float], budget: int
) -> DraftTree:
    """The tree of the best `budget` candidates (candidate parents: -1 = root, else a candidate id)."""
    chosen = select_best(parents, scores, budget)
    node_of = {-1: 0}
    tree = DraftTree.root_only(root)
    for c in chosen:
        node_of[c] = len(tree.tokens)
        parent = node_of[parents[c]]
        tree.tokens.append(int(tokens[c]))
        tree.parents.append(parent)
        tree.depths.append(tree.depths[parent] + 1)
        tree.cand.append(c)
    return tree


def topk_pick(log_q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy children: the k most likely tokens, scored by their log-prob."""
    vals, idx = log_q.topk(min(k, log_q.shape[-1]), dim=-1)
    return idx, vals


def grow_tree(
    root: int,
    root_log_q: torch.Tensor,
    expand: ExpandFn,
    budget: int,
    depth: int,
    top_k: int,
    pick: PickFn = topk_pick,
    min_score: float = float("-inf"),
) -> tuple[DraftTree, dict[int, torch.Tensor]]:
    """Grow `depth` levels, then keep the best `budget` candidates by cumulative score.

    Each level expands the frontier (the top_k candidates of the previous level by cumulative score)
    with top_k children each; candidates scoring below `min_score` are not expanded, so drafting stops
    early where the draft is unsure (each level costs a draft forward). Returns the tree and the
    children's log-distribution of every expanded candidate (-1 = root), which lossless sampling
    needs to verify the children.
    """
    tok, inc = pick(root_log_q[None], top_k)
    cand_tok, cand_par, cand_score = tok[0].tolist(), [-1] * tok.shape[1], inc[0].tolist()
    dists = {-1: root_log_q}
    frontier = [c for c in range(len(cand_tok)) if cand_score[c] > float("-inf") and cand_score[c] >= min_score]
    parent_rows = [0] * len(frontier)
    for d in range(1, depth):
        if not frontier:
            break
        log_q = expand(parent_rows, [cand_tok[c] for c in frontier], d)  # (F, V)
        tok, inc = pick(log_q, top_k)  # (F, k)
        cum = torch.tensor([cand_score[c] for c in frontier], dtype=torch.float64)[:, None] + inc.double().cpu()
        base, k = len(cand_tok), tok.shape[1]
        for row, c in enumerate(frontier):
            dists[c] = log_q[row]
        cand_tok += tok.flatten().tolist()
        cand_par += [c for c in frontier for _ in range(k)]
        cand_score += cum.flatten().tolist()
        order = sorted(range(len(frontier) * k), key=lambda j: (-cand_score[base + j], j))[:top_k]
        order = [j for j in order if cand_score[base + j] > float("-inf") and cand_score[base + j] >= min_score]
        frontier = [base + j for j in order]
        parent_rows = [j // k for j in order]
    return build_tree(root, cand_tok, cand_par, cand_score, budget), dists


def graft_chain(tree: DraftTree, chain: Sequence[int], cap: int) -> tuple[DraftTree, list[int]]:
    """The draft tree with a looked-up `chain` below its root, at most `cap` draft tokens in all.

    The chain follows the tree's nodes while their tokens agree and continues as new nodes (cand -1: no
    draft distribution) from there. To stay within `cap`, the draft's nodes are cut from the end: they
    come best first and parents first, so every prefix is a tree. Returns the tree and the chain's node
    ids (a node the draft proposed too counts for both).
    """
    chain = [int(t) for t in chain][:cap]
    for keep in range(min(tree.size, cap), -1, -1):
        kids = tree_children(tree.parents[: keep + 1])
        node, nodes, new = 0, [], 0
        for t in chain:
            node = next((c for c in kids[node] if tree.tokens[c] == t), -1) if node >= 0 else -1
            new += node < 0
            nodes.append(node)
        if keep + new <= cap:
            break
    out = DraftTree(tree.tokens[: keep + 1], tree.parents[: keep + 1], tree.depths[: keep + 1], tree.cand[: keep + 1])
    parent = 0
    for i, (t, node) in enumerate(zip(chain, nodes, strict=True)):
        if node < 0:  # the chain leaves the draft's tree here: every later token is a new node
            node = len(out.tokens)
            out.tokens.append(t)
            out.parents.append(parent)
            out.depths.append(i + 1)
            out.cand.append(-1)
            nodes[i] = node
        parent = node
    return out, nodes
