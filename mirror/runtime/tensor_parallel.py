"""Tensor parallelism for the target across several workers (torch.distributed: gloo on CPU,
NCCL on GPU).

Every linear layer is split by output columns: rank r holds rows [r*n, (r+1)*n) of W, reads only
those weights, and an all-gather rebuilds the full output. Because each output column is still
one complete dot product computed by the same kernel, the result is bitwise identical to the
unsplit model (checked in tests) - tensor parallelism cannot change greedy output. Attention
and norms run replicated on the gathered activations, so every rank keeps a full KV replica.

Rank 0 drives: `TPDriver` forwards each model call (prefill, layer ranges, heads) to the other
ranks, which run `follow()` and execute the same calls in the same order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..models.ops import Linear


class ShardedLinear(nn.Module):
    def __init__(self, full: Linear, rank: int, world: int, group=None):
        super().__init__()
        N = full.out_features
        self.out_features, self.in_features = N, full.in_features
        self.chunk = -(-N // world)  # ceil: all_gather needs equal sizes; the last shard is padded
        lo, hi = min(N, rank * self.chunk), min(N, (rank + 1) * self.chunk)
        self.local = Linear(full.in_features, max(hi - lo, 1), bias=full.bias is not None, dtype=full.weight.dtype)
        with torch.no_grad():
            w = full.weight.detach()[lo:hi]
            if hi == lo:  # more ranks than columns: an idle shard
                w = torch.zeros(1, full.in_features, dtype=w.dtype)
            self.local.weight = nn.Parameter(w.clone(), requires_grad=False)
            if full.bias is not None:
                b = full.bias.detach()[lo:hi] if hi > lo else torch.zeros(1, dtype=w.dtype)
                self.local.bias = nn.Parameter(b.clone(), requires_grad=False)
        self.local.pack()
        self.n_local = hi - lo
        self.world, self.group = world, group
        self.weight = full.weight  # kept for shape queries (weights_bytes etc.); not read in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        if self.n_local < self.chunk:
            pad = torch.zeros(*y.shape[:-1], self.chunk - self.n_local, dtype=y.dtype, device=y.device)
            y = torch.cat([y[..., :self.n_local], pad], dim=-1)
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[..., :self.out_features]


def shard_model(model: nn.Module, rank: int, world: int, group=None) -> nn.Module:
    """Replace every Linear with its column shard (in place). Tied embeddings stay intact: the
    embedding lookup keeps the full table, the LM head becomes a shard of it."""
    if world == 1:
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                setattr(parent, name, ShardedLinear(child, rank, world, group))
    return model


class TPDriver:
    """Rank 0's handle on a tensor-parallel model: same interface as Transformer for what the
    pipelines use, each call mirrored to the followers via broadcast_object_list."""

    def __init__(self, model, group=None):
        self.model = model
        self.group = group
        self.cfg, self.dtype = model.cfg, model.dtype
        self._caches: list = []

    def _cast(self, op: str, *args):
        dist.broadcast_object_list([(op, args)], src=0, group=self.group)

    @property
    def device(self):
        return self.model.device

    def new_cache(self, max_batch: int = 1, max_len: int | None = None, layers=None):
        self._cast("new_cache", max_batch, max_len)
        cache = self.model.new_cache(max_batch, max_len, layers)
        cache._tp_id = len(self._caches)
        self._caches.append(cache)
        return cache

    def __call__(self, tokens, positions, cache, start=0, end=None, rows=None, kv_len=None, last_only=False):
        self._cast("forward", tokens, positions, cache._tp_id, start, end, rows, kv_len, last_only)
        return self.model(tokens, positions, cache, start, end, rows, kv_len, last_only)

    def embed(self, tokens):
        self._cast("embed", tokens)
        return self.model.embed(tokens)

    def forward_layers(self, h, positions, cache, start=0, end=None, rows=None, kv_len=None):
        self._cast("forward_layers", h, positions, cache._tp_id, start, end, rows, kv_len)
        return self.model.forward_layers(h, positions, cache, start, end, rows, kv_len)

    def head(self, h):
        self._cast("head", h)
        return self.model.head(h)

    def release(self) -> None:
        """Drop per-request caches on every rank."""
        self._cast("release")
        self._caches.clear()

    def stop(self) -> None:
        self._cast("stop")


def follow(model, group=None) -> None:
    """Followers: execute rank 0's calls until it says stop."""
    caches: list = []
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        op, args = box[0]
        if op == "stop":
            return
        if op == "release":
            caches.clear()
        elif op == "new_cache":
            caches.append(model.new_cache(*args))
        elif op == "forward":
            tokens, positions, cid, start, end, rows, kv_len, last_only = args
            model(tokens, positions, caches[cid], start, end, rows, kv_len, last_only)
        elif op == "embed":
            model.embed(*args)
        elif op == "forward_layers":
            h, positions, cid, start, end, rows, kv_len = args
            model.forward_layers(h, positions, caches[cid], start, end, rows, kv_len)
        elif op == "head":
            model.head(*args)
        else:
            raise RuntimeError(f"unknown tensor-parallel op {op!r}")
