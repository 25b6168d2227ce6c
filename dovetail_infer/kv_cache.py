"""Static KV cache: allocated once, written in place, rolled back or compacted after verification."""

from __future__ import annotations

import torch


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class KVCache:
    """Keys and values, one preallocated (B, Hk, max_len, d) tensor per layer.

    `length` is the committed prefix. A forward writes new entries at [start, start+T) and attends over
    [0, start+T); entries past `length` are scratch (a draft tree) until `commit` keeps some of them.
    One buffer per layer (not one stacked tensor) so a compiled step mutates each in place: writing into
    a slice of a stacked buffer made torch.compile copy the whole stack every layer (measured 2x slower).
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
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, cfg, max_len: int, batch: int = 1, dtype=torch.float32, device="cpu") -> KVCache:
        return cls(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, max_len, batch, dtype, device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def update(
        self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor, round_to: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, Hk, T, d) at [start, start+T) and return the keys/values to attend over.

        `start` an int: the prefix [0, start+T) (shapes grow with the sequence), extended to a multiple of
        `round_to` slots where the buffer has them (scratch slots the caller must not weight). `start` a 0-d
        tensor: the whole buffer (static shapes for torch.compile; the caller's mask hides the other slots)."""
        if isinstance(start, torch.Tensor):
            idx = start + torch.arange(k.shape[2], device=k.device)
            self.k[layer].index_copy_(2, idx, k)
            self.v[layer].index_copy_(2, idx, v)
            return self.k[layer], self.v[layer]
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: need {end} positions, the cache holds {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        stop = min(round_up(end, round_to), self.max_len)
        return self.k[layer][:, :, :stop], self.v[layer][:, :, :stop]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (batched generation drops finished sequences)."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]

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
        idx = torch.as_tensor(slots, device=self.k[0].device, dtype=torch.long)
        n = idx.numel()
        if n and not torch.equal(idx, torch.arange(start, start + n, device=idx.device)):
            for buf in self.k + self.v:
                buf[:, :, start : start + n] = buf.index_select(2, idx)
        self.length = start + n
