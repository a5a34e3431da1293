"""Preallocated KV cache written by position, with per-row lengths and O(1) rollback.

Layout: k, v are `[n_layers, max_batch, n_kv_heads, max_len, head_dim]`. A forward writes the
keys/values of its tokens at their positions; entries past a row's length are stale and are
never read before being overwritten, because attention only looks at keys at positions <= the
query's own position and a row always re-writes from its length onwards. So rollback is just
moving the length counter back (gpt-fast / vLLM style): no reallocation, no copy.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, max_batch: int, n_kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", layers: range | None = None):
        # `layers` lets a cache hold only some layers of a model (e.g. a self-draft's [0, k)).
        self.layers = layers if layers is not None else range(n_layers)
        n = len(self.layers)
        self.k = torch.zeros(n, max_batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.max_batch, self.max_len = max_batch, max_len
        self.lengths = [0] * max_batch  # host-side: committed tokens per row

    @classmethod
    def for_model(cls, cfg, max_batch: int = 1, max_len: int | None = None,
                  dtype: torch.dtype = torch.float32, device="cpu",
                  layers: range | None = None) -> "KVCache":
        return cls(cfg.n_layers, max_batch, cfg.n_kv_heads, max_len or cfg.max_seq_len,
                   cfg.head_dim, dtype=dtype, device=device, layers=layers)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = i - self.layers.start
        if not 0 <= j < len(self.layers):
            raise IndexError(f"layer {i} is not held by this cache (holds {self.layers})")
        return self.k[j], self.v[j]

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """rows: [B] row ids; positions: [B, T]; k, v: [B, T, n_kv_heads, head_dim]."""
        kc, vc = self.layer(layer)
        b_idx = rows[:, None].expand_as(positions)
        kc[b_idx, :, positions] = k
        vc[b_idx, :, positions] = v

    def write_span(self, layer: int, rows: range, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Like write, for rows r0..r1 all at positions start..start+T-1: a slice copy."""
        kc, vc = self.layer(layer)
        T = k.shape[1]
        kc[rows.start:rows.stop, :, start:start + T] = k.transpose(1, 2)
        vc[rows.start:rows.stop, :, start:start + T] = v.transpose(1, 2)

    def rollback(self, row: int, length: int) -> None:
        """Drop everything at positions >= length in `row`. O(1): only the counter moves."""
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"cannot roll row {row} back to {length}: it holds {self.lengths[row]}")
        self.lengths[row] = length

    def set_length(self, row: int, length: int) -> None:
        if not 0 <= length <= self.max_len:
            raise ValueError(f"length {length} outside [0, {self.max_len}]")
        self.lengths[row] = length

    def fork(self, src: int, dst: list[int] | range, length: int | None = None) -> None:
        """Copy the first `length` positions of row `src` into rows `dst` (shared prefix)."""
        n = self.lengths[src] if length is None else length
        if n > self.lengths[src]:
            raise ValueError(f"row {src} holds {self.lengths[src]} < {n} positions")
        dst = list(dst)
        if not dst:
            return
        idx = torch.tensor(dst, device=self.k.device)
        self.k[:, idx, :, :n] = self.k[:, src:src + 1, :, :n]
        self.v[:, idx, :, :n] = self.v[:, src:src + 1, :, :n]
        for d in dst:
            self.lengths[d] = n

    def reset(self) -> None:
        self.lengths = [0] * self.max_batch
