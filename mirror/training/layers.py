"""Cache-free, autograd-friendly forwards of the draft's trainable parts.

Same math as inference (`mirror.models.llama.Block` with StepContext, and speculative streaming
in `mirror.decoding.drafters.streaming`), written over whole sequences with a mask instead of a
KV cache so they can be trained in parallel over positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.llama import Block, rotate_half


def block_train(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
    """x [B, L, dim]; cos/sin [L, hd] (per-token positions already applied); mask [L, L] bool
    (True = may attend) or None for plain causal."""
    cfg = block.cfg
    B, L, _ = x.shape
    H, Hk, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    a = block.attn_norm(x)
    qkv = F.linear(a, block.wqkv.weight, block.wqkv.bias)
    q, k, v = qkv.split([H * hd, Hk * hd, Hk * hd], dim=-1)
    q = q.view(B, L, H, hd)
    k = k.view(B, L, Hk, hd)
    v = v.view(B, L, Hk, hd)
    if block.q_norm is not None:
        q, k = block.q_norm(q), block.k_norm(k)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    q = q * c + rotate_half(q) * s
    k = k * c + rotate_half(k) * s
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, L, hd]
    k = k.repeat_interleave(cfg.n_rep, dim=1)
    v = v.repeat_interleave(cfg.n_rep, dim=1)
    if mask is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    o = o.transpose(1, 2).reshape(B, L, H * hd)
    x = x + F.linear(o, block.wo.weight)
    g, u = F.linear(block.ffn_norm(x), block.w13.weight).chunk(2, dim=-1)
    return x + F.linear(F.silu(g) * u, block.w2.weight)


def stream_mask(S: int, n_streams: int, device=None) -> torch.Tensor:
    """Mask over [main 0..S-1] + [stream (t, k) for t in 0..S-1, k in 1..n_streams] (row-major
    by t): main t sees main <= t; stream (t, k) sees main <= t and streams (t, k' <= k)."""
    n = S * (1 + n_streams)
    t_main = torch.arange(S, device=device)
    t_str = torch.arange(S, device=device).repeat_interleave(n_streams)
    k_str = torch.arange(1, n_streams + 1, device=device).repeat(S)
    tq = torch.cat([t_main, t_str])  # anchor token of each query
    kq = torch.cat([torch.zeros(S, dtype=torch.long, device=device), k_str])  # 0 = main
    main_key = kq[None, :] == 0
    same_anchor = tq[None, :] == tq[:, None]
    allowed = (main_key & (tq[None, :] <= tq[:, None])) | (~main_key & same_anchor & (kq[None, :] <= kq[:, None])
                                                           & (kq[:, None] > 0))
    assert allowed.shape == (n, n)
    return allowed


def stream_positions(S: int, n_streams: int, device=None) -> torch.Tensor:
    t = torch.arange(S, device=device)
    k = torch.arange(1, n_streams + 1, device=device)
    return torch.cat([t, (t[:, None] + k[None, :]).reshape(-1)])
