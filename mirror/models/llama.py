"""One Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2) with a layer-range forward.

The same module runs the target prefix `[0, l_e)`, the suffix `[l_e, N)` and a self-draft
`[0, k)`: `forward_layers(h, ..., start, end)` maps the hidden state entering layer `start` to
the one leaving layer `end - 1`. `head(h)` is the final norm + LM head, so it doubles as the
early-exit head on any layer's hidden state.

Shapes: B = batch rows, T = tokens per row in this call, S = key positions attended to.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .ops import Linear, RMSNorm, pack_linears


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "freq_factors":  # GGUF stores llama3 scaling as precomputed per-frequency factors
        inv_freq = inv_freq / torch.tensor(sc["factors"], dtype=torch.float64)
    elif kind == "llama3":
        factor = sc["factor"]
        low, high = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old_ctx = sc.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_mid, mid, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / sc["factor"]
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope scaling type {kind!r}")
    return inv_freq.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype):
        super().__init__()
        self.layer_id = layer_id
        self.cfg = cfg
        hd = cfg.head_dim
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        # q, k, v fused into one matmul: [dim] -> [(n_heads + 2 * n_kv_heads) * head_dim]
        self.wqkv = Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd, bias=cfg.qkv_bias, dtype=dtype)
        self.wo = Linear(cfg.n_heads * hd, cfg.dim, dtype=dtype)
        self.q_norm = RMSNorm(hd, cfg.norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps, dtype) if cfg.qk_norm else None
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.w13 = Linear(cfg.dim, 2 * cfg.ffn_dim, dtype=dtype)  # gate and up, fused
        self.w2 = Linear(cfg.ffn_dim, cfg.dim, dtype=dtype)

    def forward(self, x: torch.Tensor, ctx: "StepContext", cache: KVCache) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        H, Hk, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = self.wqkv(self.attn_norm(x))
        q, k, v = qkv.split([H * hd, Hk * hd, Hk * hd], dim=-1)
        q = q.view(B, T, H, hd)
        k = k.view(B, T, Hk, hd)
        v = v.view(B, T, Hk, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * ctx.cos + rotate_half(q) * ctx.sin  # cos/sin: [B, T, 1, hd]
        k = k * ctx.cos + rotate_half(k) * ctx.sin
        cache.write(self.layer_id, ctx.rows_t, ctx.positions, k, v)
        kc, vc = cache.layer(self.layer_id)
        keys, vals = ctx.select(kc), ctx.select(vc)  # [B, Hk, S, hd]
        # Group query heads by their kv head: [B, Hk, n_rep * T, hd], row = r * T + t
        qg = q.view(B, T, Hk, cfg.n_rep, hd).permute(0, 2, 3, 1, 4).reshape(B, Hk, cfg.n_rep * T, hd)
        scores = torch.matmul(qg, keys.transpose(-1, -2)) * ctx.scale + ctx.mask  # [B, Hk, n_rep*T, S]
        probs = torch.softmax(scores.float(), dim=-1).to(vals.dtype)
        o = torch.matmul(probs, vals)  # [B, Hk, n_rep*T, hd]
        o = o.view(B, Hk, cfg.n_rep, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, H * hd)
        x = x + self.wo(o)
        gu = self.w13(self.ffn_norm(x))
        g, u = gu.chunk(2, dim=-1)
        return x + self.w2(F.silu(g) * u)


class StepContext:
    """Per-forward tensors shared by all layers: RoPE rows, the causal mask, cache rows."""

    __slots__ = ("positions", "rows", "rows_t", "cos", "sin", "mask", "scale", "kv_len")

    def __init__(self, model: "Transformer", positions: torch.Tensor, rows, kv_len: int):
        B, T = positions.shape
        self.positions = positions
        self.rows = rows
        self.rows_t = torch.as_tensor(list(rows) if isinstance(rows, range) else rows,
                                      device=positions.device)
        self.cos = model.rope_cos[positions].unsqueeze(2).to(model.dtype)  # [B, T, 1, hd]
        self.sin = model.rope_sin[positions].unsqueeze(2).to(model.dtype)
        key_pos = torch.arange(kv_len, device=positions.device)
        allowed = key_pos[None, None, :] <= positions[:, :, None]  # [B, T, S]
        mask = torch.zeros(allowed.shape, dtype=model.dtype, device=positions.device)
        mask.masked_fill_(~allowed, float("-inf"))
        self.mask = mask.unsqueeze(1).repeat(1, 1, model.cfg.n_rep, 1)  # [B, 1, n_rep*T, S]
        self.scale = 1.0 / math.sqrt(model.cfg.head_dim)
        self.kv_len = kv_len

    def select(self, c: torch.Tensor) -> torch.Tensor:
        if isinstance(self.rows, range) and self.rows.step == 1:
            return c[self.rows.start:self.rows.stop, :, :self.kv_len]
        return c[self.rows_t, :, :self.kv_len]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim, dtype=dtype)
        self.layers = nn.ModuleList(Block(cfg, i, dtype) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, dtype=dtype)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_rope()
        # When True, a single-token call is padded to two tokens so every matmul runs the same
        # kernel as in a multi-token verification window (see ops.py).
        self.batch_invariant = True

    # --- construction helpers -------------------------------------------------------------
    def init_rope(self, device=None) -> None:
        """(Re)build the RoPE tables; they are derived from the config, not stored."""
        t = torch.arange(self.cfg.max_seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, rope_inv_freq(self.cfg).to(t.device))
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_seq_len, head_dim]
        self.rope_cos, self.rope_sin = emb.cos(), emb.sin()

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> "Transformer":
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g) * (4.0 if "tok_emb" in name else 1.0))
        self.prepare()
        return self

    def prepare(self) -> "Transformer":
        """Freeze for inference: eval mode, no grads, packed weights."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        pack_linears(self)
        return self

    def new_cache(self, max_batch: int = 1, max_len: int | None = None,
                  layers: range | None = None) -> KVCache:
        return KVCache.for_model(self.cfg, max_batch=max_batch, max_len=max_len, dtype=self.dtype,
                                 device=self.tok_emb.weight.device, layers=layers)

    # --- forward pieces ---------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(tokens)  # [B, T, dim]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head; on an intermediate layer's hidden state this is the early exit."""
        return self.lm_head(self.norm(h))

    def forward_layers(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                       start: int = 0, end: int | None = None, rows=None,
                       kv_len: int | None = None) -> torch.Tensor:
        """Run layers [start, end) on h: [B, T, dim] at positions [B, T]; writes KV at positions."""
        end = self.cfg.n_layers if end is None else end
        if not 0 <= start <= end <= self.cfg.n_layers:
            raise ValueError(f"bad layer range [{start}, {end}) for {self.cfg.n_layers} layers")
        B, T, _ = h.shape
        if rows is None:
            rows = range(B)
        if kv_len is None:
            kv_len = int(positions.max()) + 1
        pad = self.batch_invariant and T == 1
        if pad:  # duplicate the token at the same position: identical KV write, 2-row kernels
            h = h.expand(B, 2, h.shape[-1])
            positions = positions.expand(B, 2)
        ctx = StepContext(self, positions, rows, kv_len)
        for layer in self.layers[start:end]:
            h = layer(h, ctx, cache)
        return h[:, :1] if pad else h

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                start: int = 0, end: int | None = None, rows=None, kv_len: int | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Full forward from token ids to logits [B, T, vocab] (or [B, 1, vocab] if last_only)."""
        h = self.forward_layers(self.embed(tokens), positions, cache, start, end, rows, kv_len)
        if last_only:
            h = h[:, -1:]
        return self.head(h)

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights a decode step reads: every matrix once, one embedding row."""
        n = 0
        for name, p in self.named_parameters():
            if name == "tok_emb.weight":
                n += p.shape[1] * p.element_size()
                if self.cfg.tie_embeddings:
                    n += p.numel() * p.element_size()  # read again as the LM head
            else:
                n += p.numel() * p.element_size()
        return n
