"""The draft network as static-shape graphs for export: the same math as `DraftNet.forward`,
`DraftNet.forward_branch` and `forward_with_streams`, written with tensors only.

Every shape is fixed at export time: L = cache layers, S = max_len (cache positions),
T = step width, R = hypothesis rows, W = branch slots. Lengths and masks come in as tensors.

KV design: the graphs *read* the caches and return only the new entries (`k_new`, `v_new`);
the runtime writes them into its host buffers at their positions. The host cache is one
`[L, 1, Hk, S, hd]` buffer per K and V; the graphs take it as one input per layer
(`k_cache_0..`, `[1, Hk, S, hd]`, each a contiguous slice bound by pointer), because selecting a
layer out of a single 5-D input makes ONNX Runtime copy the whole cache every call. Attention is split into the
cached part (keys at positions < pos0, or < prefix[r] for branch rows) and the part produced in
this call (the new tokens' own keys, causal), joined in one softmax - the `BranchContext` math.
So the cache is never copied inside the graph and the runtime can bind it by pointer (a layer's
`[1, Hk, S, hd]` input is squeezed, which aliases, never indexed, which ONNX Runtime's Gather copies).

All graphs run in fp32; weights are the draft's own (tied embedding/head stay one tensor).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

NEG = torch.finfo(torch.float32).min  # a finite "minus infinity": NPU compilers dislike inf


def _linear(lin, x: torch.Tensor) -> torch.Tensor:
    # F.linear directly: the packed oneDNN path of ops.Linear is a CPU-only custom op
    return F.linear(x, lin.weight, lin.bias)


def _fp32_copy(module: nn.Module) -> nn.Module:
    """An fp32 copy; oneDNN-packed weights (opaque tensors, cannot be copied) are left out."""
    memo = {id(m._packed): None for m in module.modules() if getattr(m, "_packed", None) is not None}
    return copy.deepcopy(module, memo).float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DraftGraph(nn.Module):
    """Shared weights and per-layer pieces of the draft; subclasses add the attention."""

    def __init__(self, net, max_len: int):
        super().__init__()
        if net.dtype != torch.float32:  # never cast the target's shared modules in place
            net = copy.copy(net)
            net.embed, net.blocks, net.norm, net.head = map(_fp32_copy, (net.embed, net.blocks, net.norm, net.head))
            net.streams = _fp32_copy(net.streams) if net.streams is not None else None
        self.embed, self.blocks, self.norm, self.head = net.embed, net.blocks, net.norm, net.head
        self.streams = net.streams
        cfg = net.cfg
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.n_rep = cfg.n_heads // cfg.n_kv_heads
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.max_len = max_len
        self.register_buffer("rope_cos", net.rope_cos[:max_len].float().clone(), persistent=False)
        self.register_buffer("rope_sin", net.rope_sin[:max_len].float().clone(), persistent=False)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, 1, hd]; clamped so padding never indexes out of range."""
        p = positions.clamp(0, self.max_len - 1)
        return self.rope_cos[p].unsqueeze(2), self.rope_sin[p].unsqueeze(2)

    def qkv(self, blk, x, cos, sin):
        """x [B, T, dim] -> q [B, T, H, hd], k, v [B, T, Hk, hd] (RoPE applied)."""
        B, T, _ = x.shape
        H, Hk, hd = self.n_heads, self.n_kv, self.hd
        q, k, v = _linear(blk.wqkv, blk.attn_norm(x)).split([H * hd, Hk * hd, Hk * hd], dim=-1)
        q, k, v = q.view(B, T, H, hd), k.view(B, T, Hk, hd), v.view(B, T, Hk, hd)
        if blk.q_norm is not None:
            q, k = blk.q_norm(q), blk.k_norm(k)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def finish(self, blk, x, o):
        """Residual + output projection + MLP; o [B, T, H * hd]."""
        x = x + _linear(blk.wo, o)
        g, u = _linear(blk.w13, blk.ffn_norm(x)).chunk(2, dim=-1)
        return x + _linear(blk.w2, F.silu(g) * u)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return _linear(self.head, self.norm(h))

    def attend_row(self, q, k, v, kc, vc, mask_main, mask_own):
        """One cache row, T new tokens. q [1, T, H, hd]; k, v [1, T, Hk, hd]; kc, vc [Hk, S, hd];
        mask_main [S] (0 / NEG); mask_own [T, T] (query, key). -> [1, T, H * hd]."""
        _, T, H, hd = q.shape
        Hk, n_rep = self.n_kv, self.n_rep
        qg = q[0].view(T, Hk, n_rep, hd).permute(1, 2, 0, 3)  # [Hk, n_rep, T, hd]
        kn, vn = k[0].permute(1, 0, 2), v[0].permute(1, 0, 2)  # [Hk, T, hd]
        s1 = torch.matmul(qg, kc.unsqueeze(1).transpose(-1, -2)) * self.scale + mask_main  # [Hk, n_rep, T, S]
        s2 = torch.matmul(qg, kn.unsqueeze(1).transpose(-1, -2)) * self.scale + mask_own  # [Hk, n_rep, T, T]
        p = torch.softmax(torch.cat([s1, s2], -1), -1)
        S = kc.shape[1]
        o = torch.matmul(p[..., :S], vc.unsqueeze(1)) + torch.matmul(p[..., S:], vn.unsqueeze(1))
        return o.permute(2, 0, 1, 3).reshape(1, T, H * hd)  # [Hk, n_rep, T, hd] -> [1, T, H * hd]


class StepGraph(DraftGraph):
    """Serial step: 1 row, T tokens at positions pos0.. over the main cache.

    Inputs: tokens [1, T] int64 (padded after the valid ones), pos0 [1] int64 (= cached
    length: keys at positions < pos0 are valid), last [1] int64 (index of the token whose
    logits are returned), k_cache_0..k_cache_{L-1}, v_cache_0.. [1, Hk, S, hd].
    Outputs: logits [1, V'], k_new, v_new [L, 1, Hk, T, hd]."""

    def forward(self, tokens, pos0, last, *kv):
        k_cache, v_cache = kv[:len(kv) // 2], kv[len(kv) // 2:]
        T = tokens.shape[1]
        S = k_cache[0].shape[2]
        positions = pos0[:, None] + torch.arange(T)[None]  # [1, T]
        cos, sin = self.rope(positions)
        mask_main = torch.where(torch.arange(S) < pos0, 0.0, NEG)  # [S]
        idx = torch.arange(T)
        mask_own = torch.where(idx[None, :] <= idx[:, None], 0.0, NEG)  # causal [T, T]
        h = self.embed(tokens)
        ks, vs = [], []
        for i, blk in enumerate(self.blocks):
            q, k, v = self.qkv(blk, h, cos, sin)
            o = self.attend_row(q, k, v, k_cache[i].squeeze(0), v_cache[i].squeeze(0), mask_main, mask_own)
            h = self.finish(blk, h, o)
            ks.append(k.permute(0, 2, 1, 3))
            vs.append(v.permute(0, 2, 1, 3))
        h_last = torch.index_select(h[0], 0, last)  # [1, dim]
        return self.logits(h_last), torch.stack(ks), torch.stack(vs)


class BranchGraph(DraftGraph):
    """Mirror-SD hypothesis rows (see BranchContext): R rows x 1 token. Row r attends to the
    main cache at positions < prefix[r], to its own earlier tokens in the branch buffer (slots
    < positions[r] - prefix[r]) and to itself.

    Inputs: tokens [R, 1] int64, positions [R] int64, prefix [R] int64, per layer i:
    k_cache_i, v_cache_i [1, Hk, S, hd] (the main row), k_own_i, v_own_i [R, Hk, W, hd].
    Outputs: logits [R, V'], k_new, v_new [L, R, Hk, hd] (the entries for slot positions - prefix)."""

    def forward(self, tokens, positions, prefix, *kv):
        L = len(kv) // 4
        k_cache, v_cache, k_own, v_own = kv[:L], kv[L:2 * L], kv[2 * L:3 * L], kv[3 * L:]
        R = tokens.shape[0]
        S, W = k_cache[0].shape[2], k_own[0].shape[2]
        Hk, n_rep, hd = self.n_kv, self.n_rep, self.hd
        cos, sin = self.rope(positions[:, None])
        mask_main = torch.where(torch.arange(S)[None] < prefix[:, None], 0.0, NEG)  # [R, S]
        slots = positions - prefix
        mask_own = torch.where(torch.arange(W)[None] < slots[:, None], 0.0, NEG)  # [R, W]
        mask_main, mask_own = mask_main[:, None, None, :], mask_own[:, None, None, :]
        h = self.embed(tokens)  # [R, 1, dim]
        ks, vs = [], []
        for i, blk in enumerate(self.blocks):
            q, k, v = self.qkv(blk, h, cos, sin)
            qr = q[:, 0].view(R, Hk, n_rep, hd)
            kr, vr = k[:, 0], v[:, 0]  # [R, Hk, hd]
            mk, mv = k_cache[i].squeeze(0), v_cache[i].squeeze(0)  # [Hk, S, hd], read once for all rows
            qh = qr.permute(1, 0, 2, 3).reshape(Hk, R * n_rep, hd)
            s1 = torch.matmul(qh, mk.transpose(-1, -2)).view(Hk, R, n_rep, S).permute(1, 0, 2, 3)
            s2 = torch.matmul(qr, k_own[i].transpose(-1, -2))  # [R, Hk, n_rep, W]
            s3 = (qr * kr[:, :, None, :]).sum(-1, keepdim=True)  # [R, Hk, n_rep, 1]
            s = torch.cat([s1 * self.scale + mask_main, s2 * self.scale + mask_own, s3 * self.scale], -1)
            p = torch.softmax(s, -1)
            p1 = p[..., :S].permute(1, 0, 2, 3).reshape(Hk, R * n_rep, S)
            o1 = torch.matmul(p1, mv).view(Hk, R, n_rep, hd).permute(1, 0, 2, 3)
            o2 = torch.matmul(p[..., S:S + W], v_own[i])  # [R, Hk, n_rep, hd]
            o3 = p[..., S + W:] * vr[:, :, None, :]
            o = (o1 + o2 + o3).reshape(R, 1, Hk * n_rep * hd)
            h = self.finish(blk, h, o)
            ks.append(kr)
            vs.append(vr)
        return self.logits(h[:, 0]), torch.stack(ks), torch.stack(vs)


class StreamGraph(DraftGraph):
    """Speculative streaming pass (see streaming.py): T main tokens (n_valid of them real) at
    pos0.., then gamma_s streams after the last real one, which run only in the top N_s blocks.

    Inputs: tokens [1, T], pos0 [1], n_valid [1], k_cache_i, v_cache_i [1, Hk, S, hd].
    Outputs: main logits [T, V'], stream logits [gamma_s, V'], k_new, v_new [L, 1, Hk, T, hd]
    (main tokens only: stream keys are used inside the pass and never cached)."""

    def forward(self, tokens, pos0, n_valid, *kv):
        k_cache, v_cache = kv[:len(kv) // 2], kv[len(kv) // 2:]
        T = tokens.shape[1]
        S = k_cache[0].shape[2]
        gs = self.streams.n_streams
        L0 = len(self.blocks) - self.streams.n_layers
        idx = torch.arange(T)
        positions = pos0[:, None] + idx[None]  # [1, T]
        mask_main = torch.where(torch.arange(S) < pos0, 0.0, NEG)
        mask_own = torch.where(idx[None, :] <= idx[:, None], 0.0, NEG)
        cos, sin = self.rope(positions)
        h = self.embed(tokens)
        ks, vs = [], []
        for i, blk in enumerate(self.blocks[:L0]):
            q, k, v = self.qkv(blk, h, cos, sin)
            h = self.finish(blk, h, self.attend_row(q, k, v, k_cache[i].squeeze(0), v_cache[i].squeeze(0), mask_main, mask_own))
            ks.append(k.permute(0, 2, 1, 3))
            vs.append(v.permute(0, 2, 1, 3))
        h_last = torch.index_select(h[0], 0, n_valid - 1)  # [1, dim]
        hh = torch.cat([h, self.streams(h_last)], 1)  # [1, T + gs, dim]
        spos = pos0 + n_valid - 1 + torch.arange(1, gs + 1)  # [gs]
        pp = torch.cat([positions[0], spos])  # [T + gs]
        valid = torch.cat([idx < n_valid, torch.ones(gs, dtype=torch.bool)])
        allowed = (pp[None, :] <= pp[:, None]) & valid[None, :]  # [query, key]
        mask_top = torch.where(allowed, 0.0, NEG)
        cos, sin = self.rope(pp[None])
        for i, blk in enumerate(self.blocks[L0:], start=L0):
            q, k, v = self.qkv(blk, hh, cos, sin)
            hh = self.finish(blk, hh, self.attend_row(q, k, v, k_cache[i].squeeze(0), v_cache[i].squeeze(0), mask_main, mask_top))
            ks.append(k[:, :T].permute(0, 2, 1, 3))
            vs.append(v[:, :T].permute(0, 2, 1, 3))
        logits = self.logits(hh[0])  # [T + gs, V']
        return logits[:T], logits[T:], torch.stack(ks), torch.stack(vs)
