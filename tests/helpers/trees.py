"""A tree with siblings between a node and its ancestors, and its depths and mask."""

from __future__ import annotations

import torch

# a root with five children, branching again below: siblings' slots sit between a node and its ancestors
PARENTS = [-1, 0, 0, 0, 0, 0, 1, 1, 2, 3, 6, 6, 8, 10, 10, 13]


def ancestry(parents: list[int]) -> tuple[list[int], torch.Tensor]:
    """Depths and the tree mask (node i sees j: j is i or an ancestor of i)."""
    depth, seen = [], torch.zeros(len(parents), len(parents), dtype=torch.bool)
    for i, p in enumerate(parents):
        depth.append(0 if p < 0 else depth[p] + 1)
        seen[i, i] = True
        if p >= 0:
            seen[i] |= seen[p]
    return depth, seen
