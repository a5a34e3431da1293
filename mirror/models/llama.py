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
        o = ctx.attend(self.layer_id, q, k, v, cache)  # [B, T, H * hd]
        x = x + self.wo(o)
        gu = self.w13(self.ffn_norm(x))
        g, u = gu.chunk(2, dim=-1)
        return x + self.w2(F.silu(g) * u)


class StepContext:
    """Per-forward tensors shared by all layers: RoPE rows, the causal mask, cache rows."""

    __slots__ = ("positions", "rows", "rows_t", "cos", "sin", "mask", "scale", "kv_len", "span", "lean")

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
        # lean (drafts, whose numerics need not match anything): one fused attention kernel over
        # a [B, 1, T, S] mask; otherwise the grouped matmuls below over [B, 1, n_rep*T, S]
        self.lean = getattr(model, "lean", False)
        self.mask = mask.unsqueeze(1) if self.lean else mask.unsqueeze(1).repeat(1, 1, model.cfg.n_rep, 1)
        self.scale = 1.0 / math.sqrt(model.cfg.head_dim)
        self.kv_len = kv_len
        # rows r0..r1 all writing positions p..p+T-1 (decode, windows, prefill): slice copies
        self.span = None
        if isinstance(rows, range) and rows.step == 1 and T > 0:
            p0 = int(positions[0, 0])
            if bool((positions == torch.arange(p0, p0 + T, device=positions.device)).all()):
                self.span = p0

    def select(self, c: torch.Tensor) -> torch.Tensor:
        if isinstance(self.rows, range) and self.rows.step == 1:
            return c[self.rows.start:self.rows.stop, :, :self.kv_len]
        return c[self.rows_t, :, :self.kv_len]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cache: KVCache) -> torch.Tensor:
        """Write k, v at the tokens' positions, then causal attention over the row's cache."""
        B, T, H, hd = q.shape
        Hk = k.shape[2]
        n_rep = H // Hk
        if self.span is not None:
            cache.write_span(layer, self.rows, self.span, k, v)
        else:
            cache.write(layer, self.rows_t, self.positions, k, v)
        kc, vc = cache.layer(layer)
        keys, vals = self.select(kc), self.select(vc)  # [B, Hk, S, hd]
        if self.lean:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, attn_mask=self.mask,
                                               scale=self.scale, enable_gqa=n_rep > 1)  # [B, H, T, hd]
            return o.transpose(1, 2).reshape(B, T, H * hd)
        # Group query heads by their kv head: [B, Hk, n_rep * T, hd], row = r * T + t
        qg = q.view(B, T, Hk, n_rep, hd).permute(0, 2, 3, 1, 4).reshape(B, Hk, n_rep * T, hd)
        scores = torch.matmul(qg, keys.transpose(-1, -2)) * self.scale + self.mask  # [B, Hk, n_rep*T, S]
        probs = torch.softmax(scores.float(), dim=-1).to(vals.dtype)
        o = torch.matmul(probs, vals)  # [B, Hk, n_rep*T, hd]
        return o.view(B, Hk, n_rep, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, H * hd)


class BranchContext:
    """Attention for hypothesis rows that share one cache row's prefix (draft-side rollouts).

    Row r attends to positions `< prefix[r]` of row `main_row` of the main cache (read once for
    all rows, never copied) and to its own tokens, kept in a small branch buffer indexed by
    `slot = position - prefix[r]`. `BranchBuffer.install` copies a finished row into the main
    cache (a few positions), which is how a Mirror-SD hit becomes the draft's new state.
    """

    __slots__ = ("positions", "cos", "sin", "scale", "main_row", "prefix", "slots", "buf",
                 "mask_main", "mask_own", "s_main", "w_own", "n_rep", "row0")

    def __init__(self, model: "Transformer", positions: torch.Tensor, main_row: int,
                 prefix: torch.Tensor, buf: "BranchBuffer", s_main: int, row0: int = 0):
        R, T = positions.shape
        dev = positions.device
        self.positions = positions
        self.cos = model.rope_cos[positions].unsqueeze(2).to(model.dtype)
        self.sin = model.rope_sin[positions].unsqueeze(2).to(model.dtype)
        self.scale = 1.0 / math.sqrt(model.cfg.head_dim)
        self.main_row, self.prefix, self.buf, self.row0 = main_row, prefix, buf, row0
        self.slots = positions - prefix[:, None]  # [R, T]
        self.n_rep = model.cfg.n_rep
        self.s_main = s_main
        self.w_own = int(self.slots.max()) + 1
        neg = float("-inf")
        key_main = torch.arange(s_main, device=dev)
        m_main = (key_main[None, :] < prefix[:, None])[:, None, :].expand(R, T, s_main)  # [R, T, S]
        key_own = torch.arange(self.w_own, device=dev)
        m_own = key_own[None, None, :] <= self.slots[:, :, None]  # [R, T, W]
        self.mask_main = torch.zeros(m_main.shape, dtype=model.dtype, device=dev).masked_fill_(~m_main, neg)
        self.mask_own = torch.zeros(m_own.shape, dtype=model.dtype, device=dev).masked_fill_(~m_own, neg)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cache: KVCache) -> torch.Tensor:
        R, T, H, hd = q.shape
        Hk = k.shape[2]
        n_rep = self.n_rep
        bk, bv = self.buf.layer(layer)  # [R_max, Hk, W_max, hd]
        r0 = self.row0
        bk, bv = bk[r0:r0 + R], bv[r0:r0 + R]
        rows = torch.arange(R, device=q.device)[:, None].expand(R, T)
        bk[rows, :, self.slots] = k
        bv[rows, :, self.slots] = v
        kc, vc = cache.layer(layer)
        mk, mv = kc[self.main_row, :, :self.s_main], vc[self.main_row, :, :self.s_main]  # [Hk, S, hd]
        ok, ov = bk[:R, :, :self.w_own], bv[:R, :, :self.w_own]  # [R, Hk, W, hd]
        # shared prefix: all rows' queries in one matmul per kv head -> [Hk, R * n_rep * T, S]
        qh = q.view(R, T, Hk, n_rep, hd).permute(2, 0, 3, 1, 4)  # [Hk, R, n_rep, T, hd]
        s1 = torch.matmul(qh.reshape(Hk, R * n_rep * T, hd), mk.transpose(-1, -2))
        s1 = s1.view(Hk, R, n_rep, T, self.s_main).permute(1, 0, 2, 3, 4)  # [R, Hk, n_rep, T, S]
        qr = qh.permute(1, 0, 2, 3, 4).reshape(R, Hk, n_rep * T, hd)
        s2 = torch.matmul(qr, ok.transpose(-1, -2)).view(R, Hk, n_rep, T, self.w_own)
        s1 = s1 * self.scale + self.mask_main[:, None, None]
        s2 = s2 * self.scale + self.mask_own[:, None, None]
        p = torch.softmax(torch.cat([s1, s2], -1).float(), -1).to(q.dtype)
        p1, p2 = p.split([self.s_main, self.w_own], -1)
        o1 = torch.matmul(p1.permute(1, 0, 2, 3, 4).reshape(Hk, R * n_rep * T, self.s_main), mv)
        o1 = o1.view(Hk, R, n_rep, T, hd).permute(1, 0, 2, 3, 4)  # [R, Hk, n_rep, T, hd]
        o2 = torch.matmul(p2.reshape(R, Hk, n_rep * T, self.w_own), ov).view(R, Hk, n_rep, T, hd)
        o = o1 + o2
        return o.permute(0, 3, 1, 2, 4).reshape(R, T, H * hd)


class BranchBuffer:
    """Own-token KV of hypothesis rows: [n_layers, max_rows, n_kv_heads, max_slots, head_dim]."""

    def __init__(self, like: KVCache, max_rows: int, max_slots: int):
        n, _, hk, _, hd = like.k.shape
        self.layers = like.layers
        self.k = torch.zeros(n, max_rows, hk, max_slots, hd, dtype=like.k.dtype, device=like.k.device)
        self.v = torch.zeros_like(self.k)
        self.max_rows, self.max_slots = max_rows, max_slots

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = i - self.layers.start
        return self.k[j], self.v[j]

    def install(self, row: int, cache: KVCache, main_row: int, start: int, n_slots: int) -> None:
        """Copy branch `row`'s first n_slots own entries into the main cache at positions start.."""
        cache.k[:, main_row, :, start:start + n_slots] = self.k[:, row, :, :n_slots]
        cache.v[:, main_row, :, start:start + n_slots] = self.v[:, row, :, :n_slots]


def run_blocks(net, blocks, h: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows=None,
               kv_len: int | None = None) -> torch.Tensor:
    """Run `blocks` over h [B, T, dim] with causal attention over `cache`. `net` supplies the
    config, dtype, RoPE tables and the batch-invariance flag (a Transformer or a draft net)."""
    B, T, _ = h.shape
    if rows is None:
        rows = range(B)
    if kv_len is None:
        kv_len = int(positions.max()) + 1
    pad = net.batch_invariant and T == 1
    if pad:  # duplicate the token at the same position: identical KV write, 2-row kernels
        h = h.expand(B, 2, h.shape[-1])
        positions = positions.expand(B, 2)
    ctx = StepContext(net, positions, rows, kv_len)
    for layer in blocks:
        h = layer(h, ctx, cache)
    return h[:, :1] if pad else h


def run_blocks_branch(net, blocks, h: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                      main_row: int, prefix: torch.Tensor, buf: "BranchBuffer", s_main: int,
                      row0: int = 0) -> torch.Tensor:
    """Like run_blocks, for hypothesis rows (buffer rows row0..) sharing a prefix of `cache`
    row `main_row`."""
    ctx = BranchContext(net, positions, main_row, prefix, buf, s_main, row0)
    for layer in blocks:
        h = layer(h, ctx, cache)
    return h


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
        return run_blocks(self, self.layers[start:end], h, positions, cache, rows, kv_len)

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
