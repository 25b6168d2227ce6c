"""Static KV cache: allocated once, written in place, rolled back or compacted after verification."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values for every layer in one preallocated tensor each.

    `length` is the committed prefix. A forward writes new entries at [start, start+T) and attends over
    [0, start+T); entries past `length` are scratch (a draft tree) until `commit` keeps some of them.
    """

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, cfg, max_len: int, batch: int = 1, dtype=torch.float32, device="cpu") -> KVCache:
        return cls(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, max_len, batch, dtype, device)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: need {end} positions, the cache holds {self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.length = 0

    def rollback(self, length: int) -> None:
        """Forget everything past `length` (entries stay allocated and are overwritten later)."""
        self.length = min(self.length, length)

    def commit(self, slots: torch.Tensor | list[int], start: int | None = None) -> None:
        """Keep the entries at cache positions `slots` (ascending), moved to [start, start+len(slots)).

        Used after tree verification: the accepted path's entries are compacted right after the prefix.
        """
        start = self.length if start is None else start
        idx = torch.as_tensor(slots, device=self.k.device, dtype=torch.long)
        n = idx.numel()
        if n and not torch.equal(idx, torch.arange(start, start + n, device=idx.device)):
            self.k[:, :, :, start : start + n] = self.k.index_select(3, idx)
            self.v[:, :, :, start : start + n] = self.v.index_select(3, idx)
        self.length = start + n
