"""Speculative streaming on the draft: several tokens per forward pass.

In the draft's top N_s blocks, gamma_s lookahead streams run beside the main stream. Stream k
starts from the main hidden state of the last token at block L0 = n_blocks - N_s plus a learned
stream embedding E_k, sits at position p + k, attends to the main stream's prefix KV and to the
lower streams (their KV is written past the committed length, where the next real tokens
overwrite it), and predicts token p + 1 + k through the shared head.

Each pass feeds the last draft token plus the previous pass's stream guesses; the main stream
verifies the guesses (greedy match) and the streams of the last fed token propose new ones. The
window is therefore exactly the draft network's own greedy continuation: streams change how many
passes it takes, never what is proposed - and never what the target commits.
"""
from __future__ import annotations

import torch
from torch import nn

from ...models.llama import run_blocks
from ..messages import DraftWindow
from .network import DraftNet, NetworkDrafter


class StreamEmbeddings(nn.Module):
    """gamma_s stream embeddings [gamma_s, dim], optionally plus a rank-r update of the stream
    input (h + E_k + (h A) B_k), trained with next-token + 0.1 x future-token losses."""

    def __init__(self, n_streams: int, dim: int, n_layers: int, rank: int = 0):
        super().__init__()
        self.n_streams, self.n_layers, self.rank = n_streams, n_layers, rank
        self.emb = nn.Parameter(torch.zeros(n_streams, dim))
        if rank:
            self.down = nn.Parameter(torch.zeros(dim, rank))
            self.up = nn.Parameter(torch.zeros(n_streams, rank, dim))
        else:
            self.down = self.up = None

    def forward(self, h_last: torch.Tensor) -> torch.Tensor:
        """h_last [B, dim] -> stream inputs [B, gamma_s, dim]."""
        s = h_last[:, None, :] + self.emb[None].to(h_last.dtype)
        if self.rank:
            s = s + torch.einsum("br,krd->bkd", h_last @ self.down.to(h_last.dtype), self.up.to(h_last.dtype))
        return s


def attach_streams(net: DraftNet, streams: StreamEmbeddings | None, n_streams: int = 2,
                   n_layers: int = 1) -> DraftNet:
    if streams is None:
        streams = StreamEmbeddings(n_streams, net.cfg.dim, n_layers)
    if not 1 <= streams.n_layers <= len(net.blocks):
        raise ValueError(f"stream layers must be in [1, {len(net.blocks)}], got {streams.n_layers}")
    net.streams = streams.to(net.dtype)
    return net


def forward_with_streams(net: DraftNet, tokens: torch.Tensor, positions: torch.Tensor, cache,
                         kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Main tokens [1, T] at positions [1, T] plus streams after the last one.
    Returns (main logits [T, V'], stream logits [gamma_s, V'])."""
    st = net.streams
    L0 = len(net.blocks) - st.n_layers
    h = run_blocks(net, net.blocks[:L0], net.embed(tokens), positions, cache, kv_len=kv_len)
    s = st(h[:, -1])  # [1, gamma_s, dim]
    last = positions[:, -1:]
    spos = last + torch.arange(1, st.n_streams + 1, device=positions.device)[None]
    hh = torch.cat([h, s], dim=1)
    pp = torch.cat([positions, spos], dim=1)
    hh = run_blocks(net, net.blocks[L0:], hh, pp, cache, kv_len=int(spos[0, -1]) + 1)
    logits = net.head(net.norm(hh[0]))  # [T + gamma_s, V']
    T = tokens.shape[1]
    return logits[:T], logits[T:]


class StreamingDrafter(NetworkDrafter):
    name = "streaming"

    @torch.inference_mode()
    def propose(self, gamma: int) -> DraftWindow:
        if not self.params.greedy or self.net.streams is None:
            return super().propose(gamma)  # sampling drafts use the plain serial path
        self._reset_window_state()  # (the streamed window records no own distribution)
        n = len(self.ctx)
        pending = self.ctx[self.kv:]
        if len(pending) > 1:  # catch up (prompt prefill) without streams
            self._feed(pending[:-1], self.kv)
        start = len(self.ctx) - 1
        feed = [self.ctx[-1]]  # tokens fed this pass, at positions start..
        window: list[int] = []
        passes = 0
        while True:
            toks = torch.tensor([feed])
            pos = self.positions[:, start:start + len(feed)]
            main, streams = self.net.forward_streams(toks, pos, self.cache, kv_len=start + len(feed))
            passes += 1
            pred = self.net.to_full(main.argmax(-1)).tolist()  # main-stream greedy after each fed token
            # feed[0] is already in the window (or the root); feed[1:] are last pass's guesses
            acc = 0
            while acc < len(feed) - 1 and pred[acc] == feed[1 + acc]:
                acc += 1
            window.extend(feed[1:1 + acc])
            self.kv = start + 1 + acc  # KV valid through the last accepted fed token
            self.stats.computed += len(feed) + streams.shape[0]
            if len(window) >= gamma:
                window = window[:gamma]
                break
            window.append(pred[acc])  # the main stream's own next token
            if len(window) >= gamma:
                break
            guesses = self.net.to_full(streams.argmax(-1)).tolist() if acc == len(feed) - 1 else []
            start = start + 1 + acc
            feed = [window[-1]] + guesses[:max(0, gamma - len(window))]
        self.kv = min(self.kv, n + len(window))
        self.cache.set_length(0, self.kv)
        self.window = DraftWindow(window, None, self.name)
        self.stats.used += len(window)
        self.stats.by_source["passes"] = self.stats.by_source.get("passes", 0) + passes
        return self.window
