"""Inputs for the crash-resume tests of regeneration and feature extraction (the same in every process)."""

from __future__ import annotations

import torch


def prep_inputs() -> tuple[list, list[dict]]:
    """Eight prompts (regeneration) and eight token rows (features), the same in every process."""
    from dovetail_train.data.conversations import Conversation

    convs = [Conversation(str(i), [{"role": "user", "content": f"Question {i}: " + "why? " * i}]) for i in range(8)]
    g = torch.Generator().manual_seed(3)
    examples = []
    for i in range(8):
        ids = torch.randint(0, 49152, (5 + 3 * i,), generator=g).tolist()
        examples.append({"input_ids": ids, "loss_mask": [0, 0] + [1] * (len(ids) - 2)})
    return convs, examples
