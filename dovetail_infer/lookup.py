"""Prompt lookup: propose the tokens that followed the last time the current suffix n-gram appeared.

Answers copy from their prompts (summaries, code edits, quoted questions) and from themselves; a
match costs a dict lookup, no forward. When there is a match the engine verifies the proposal as a
chain instead of a draft tree (no draft step that round); greedy outputs are unchanged.
"""

from __future__ import annotations


class NGramIndex:
    """Where each n-gram (n = min_ngram..max_ngram) of a growing token sequence was last followed by a token.

    `extend` registers the n-grams that end just before each new token; `propose` looks the sequence's
    own suffix up, longest n-gram first, and returns up to k tokens that followed its latest earlier
    occurrence. Amortised O(max_ngram) per token.
    """

    def __init__(self, ids: list[int] | None = None, max_ngram: int = 3, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.ids: list[int] = []
        self.next_at: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram + 1)]
        self.extend(ids or [])

    def extend(self, tokens: list[int]) -> None:
        ids = self.ids
        for t in tokens:
            i = len(ids)  # position of the new token: it follows the n-grams ending at i - 1
            for n in range(self.min_ngram, min(self.max_ngram, i) + 1):
                self.next_at[n][tuple(ids[i - n : i])] = i
            ids.append(t)

    def propose(self, k: int) -> list[int]:
        """Up to k continuation tokens of the longest suffix n-gram seen before; [] when none matches."""
        ids, L = self.ids, len(self.ids)
        for n in range(min(self.max_ngram, L), self.min_ngram - 1, -1):
            i = self.next_at[n].get(tuple(ids[L - n :]))
            if i is not None:
                return ids[i : min(i + k, L)]
        return []
