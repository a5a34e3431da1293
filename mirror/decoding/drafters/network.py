"""Drafts with a network: a separate small model, or a self-draft made of the target's first k
layers + an optional adapter block + the target's LM head (Kangaroo), optionally with a
VocabTrim head and speculative-streaming lookahead streams.

`DraftNet` is the network; `NetworkDrafter` drives it: serial drafting with the confidence early
stop, and Mirror-SD branch rollouts batched as rows that share the committed prefix's KV.
"""
from __future__ import annotations

import torch
from torch import nn

from ...models.config import ModelConfig
from ...models.kv_cache import KVCache
from ...models.llama import Block, BranchBuffer, Transformer, run_blocks, run_blocks_branch
from ...models.ops import Linear, RMSNorm
from ...sampling import SamplingParams
from ..messages import DraftWindow, EarlyExitSignal, Verdict
from .base import Drafter, rank_hypotheses


def make_adapter(cfg: ModelConfig, layer_id: int, ffn_dim: int | None = None) -> Block:
    """Kangaroo adapter: one attention block + a small MLP; zero output projections make it the
    identity until trained, so an untrained self-draft is a plain early exit at layer k."""
    acfg = cfg.with_(ffn_dim=ffn_dim or max(64, cfg.dim // 2))
    blk = Block(acfg, layer_id, torch.float32)
    with torch.no_grad():
        for name, p in blk.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name in ("wo.weight", "w2.weight"):
                p.zero_()
            else:
                nn.init.normal_(p, std=0.02)
        if cfg.qkv_bias:
            blk.wqkv.bias.zero_()
    return blk


class DraftNet(nn.Module):
    """Embedding -> blocks -> final norm -> head, with its own KV cache layout.

    blocks carry their cache layer ids (self-draft: target layers 0..k-1, adapter k)."""

    def __init__(self, cfg: ModelConfig, embed: nn.Embedding, blocks: list[nn.Module], norm: RMSNorm,
                 head: Linear, rope_cos: torch.Tensor, rope_sin: torch.Tensor, dtype: torch.dtype,
                 keep_ids: torch.Tensor | None = None, streams: "nn.Module | None" = None):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.norm, self.head = norm, head
        self.rope_cos, self.rope_sin = rope_cos, rope_sin
        self.keep_ids = keep_ids  # VocabTrim: draft vocab row -> target token id
        self.streams = streams
        self.batch_invariant = False  # drafts only propose; their numerics need not be invariant
        self.lean = True  # fused attention (StepContext); branch rows use BranchContext
        ids = [b.layer_id for b in blocks]
        self.layer_range = range(min(ids), max(ids) + 1)

    @classmethod
    def from_model(cls, model: Transformer, keep_ids: torch.Tensor | None = None) -> "DraftNet":
        return cls(model.cfg, model.tok_emb, list(model.layers), model.norm,
                   trimmed_head(model.lm_head, keep_ids), model.rope_cos, model.rope_sin,
                   model.dtype, keep_ids)

    @classmethod
    def self_draft(cls, target: Transformer, k: int, adapter: Block | None = None,
                   keep_ids: torch.Tensor | None = None) -> "DraftNet":
        if not 1 <= k < target.cfg.n_layers:
            raise ValueError(f"self-draft depth k must be in [1, {target.cfg.n_layers - 1}], got {k}")
        blocks = list(target.layers[:k]) + ([adapter] if adapter is not None else [])
        return cls(target.cfg, target.tok_emb, blocks, target.norm, trimmed_head(target.lm_head, keep_ids),
                   target.rope_cos, target.rope_sin, target.dtype, keep_ids)

    @property
    def vocab(self) -> int:
        return self.head.out_features

    def new_cache(self, max_batch: int, max_len: int) -> KVCache:
        return KVCache.for_model(self.cfg, max_batch=max_batch, max_len=max_len, dtype=self.dtype,
                                 device=self.embed.weight.device, layers=self.layer_range)

    def new_branch_buffer(self, cache: KVCache, max_rows: int, max_slots: int) -> BranchBuffer:
        return BranchBuffer(cache, max_rows, max_slots)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows=None,
                kv_len: int | None = None, last_only: bool = False) -> torch.Tensor:
        h = run_blocks(self, self.blocks, self.embed(tokens), positions, cache, rows, kv_len)
        if last_only:
            h = h[:, -1:]
        return self.head(self.norm(h))  # [B, T, V']

    def forward_branch(self, tokens, positions, cache, main_row, prefix, buf, s_main,
                       row0: int = 0) -> torch.Tensor:
        """Hypothesis rows over a shared prefix (see BranchContext) -> last-token logits [R, V']."""
        h = run_blocks_branch(self, self.blocks, self.embed(tokens), positions, cache, main_row, prefix,
                              buf, s_main, row0)
        return self.head(self.norm(h[:, -1:]))[:, 0]

    def forward_streams(self, tokens, positions, cache, kv_len: int):
        """Speculative-streaming pass -> (main logits [T, V'], stream logits [gamma_s, V'])."""
        from .streaming import forward_with_streams

        return forward_with_streams(self, tokens, positions, cache, kv_len)

    def to_full(self, ids: torch.Tensor) -> torch.Tensor:
        return ids if self.keep_ids is None else self.keep_ids[ids]

    def full_probs(self, probs: torch.Tensor, vocab: int) -> torch.Tensor:
        """[.., V'] draft-vocab probabilities -> [.., V] over the target vocabulary."""
        if self.keep_ids is None:
            return probs
        out = probs.new_zeros(*probs.shape[:-1], vocab)
        out[..., self.keep_ids] = probs
        return out


def trimmed_head(head: Linear, keep_ids: torch.Tensor | None) -> Linear:
    """VocabTrim: an LM head restricted to `keep_ids` (rows of the full head, in that order)."""
    if keep_ids is None:
        return head
    from ...models.quant import QuantLinear

    if isinstance(head, QuantLinear):  # an int8 draft's head: the kept rows, still int8
        return head.rows(keep_ids)
    w = head.weight.detach()[keep_ids]
    lin = Linear(w.shape[1], w.shape[0], dtype=w.dtype)
    lin.weight = nn.Parameter(w.clone(), requires_grad=False)
    lin.pack()
    return lin


# draft_prefill=auto: the shortest prompt the fp32 graph prefills (at 64 tokens it costs what
# the bundled model's 4-bit blocks do, one AVX2 thread; below, the blocks are faster)
PREFILL_MIN = 64


class NetworkDrafter(Drafter):
    """State: `ctx` (committed tokens), `window` (the window under verification) and `kv`, the
    number of leading positions of ctx + window whose KV is valid in cache row 0. The root
    (last ctx token) and drafted tokens get KV when fed back; rejected ones are rolled back by
    moving `kv` (O(1))."""

    name = "network"
    AGREE_PRIOR = (8.0, 10.0)  # (agreed, compared) before a request's first verdict: 0.8

    def __init__(self, net: DraftNet, params: SamplingParams, vocab: int, max_len: int,
                 confidence: float = 0.0, max_rows: int = 16, gamma_max: int = 16, own_k: int = 8,
                 prefill: int | None = None, catch_up: str = "whole"):
        super().__init__(params)
        # SpecConfig.catch_up: how `prepare` gives another drafter's window (an n-gram's) its KV
        # before the pre-signal rollouts - "whole": in one call; "lazy": in short chunks that stop
        # at the first position where this draft's own top-1 is not the window's token
        self.catch_up = catch_up
        self.net, self.vocab = net, vocab
        # prompts of at least this many tokens prefill through `net.prefill` (None: none;
        # SpecConfig.draft_prefill, factory.draft_prefill)
        self.prefill = prefill
        self.confidence = confidence
        self.cache = net.new_cache(1, max_len + gamma_max + 4)
        self.buf = net.new_branch_buffer(self.cache, max_rows, gamma_max + 2)
        self.max_rows = max_rows
        self.kv = 0
        self._warm: list[int] | None = None  # the prompt warm() prefilled
        self.gen = params.generator()
        self.positions = torch.arange(self.cache.max_len)[None]
        self._branches: dict = {}
        # Pre-signal rollouts (SpecConfig.pre_budget): the draft's own top-k at window positions
        # 0..G (position j: what follows root, d_1..d_j), recorded where the logits are computed
        # anyway (own_k = 0: not recorded, no pre-signal rollouts - the factory's choice when
        # pre_budget is 0); `_pre_rows` branch rows are taken by hypotheses expanded before the signal.
        self.own_k = own_k
        self._own: dict[int, tuple[list[int], list[float]]] = {}
        self._pre_rows = 0
        # the running rollout batch: (its hypotheses, its token list, its lengths), read by peek
        self._live: tuple | None = None
        # greedy: how often the target's token at a window position was the draft's own top-1
        # (agreed, compared), from AGREE_PRIOR; calibrates own_signal (pre-signal ranking)
        self.agree = list(self.AGREE_PRIOR)

    def start(self, ctx: list[int]) -> None:
        warm, self._warm = self._warm, None
        super().start(ctx)
        self.kv = 0
        self.cache.reset()
        if warm is not None and len(warm) < len(ctx) and ctx[:len(warm)] == warm:
            self.kv = len(warm)  # the prompt's KV from warm(): only the root is left to feed
            self.cache.set_length(0, self.kv)
        self.gen = self.params.generator()
        self.agree = list(self.AGREE_PRIOR)
        self._reset_window_state()

    @torch.inference_mode()
    def warm(self, prompt: list[int]) -> None:
        self.start(prompt)
        if prompt:
            self._feed(prompt, 0)
        self._warm = list(prompt)

    @torch.inference_mode()
    def adopt_prompt(self, prompt: list[int], cache, model) -> bool:
        """In one process, after the target's prefill: when this draft would prefill `prompt`
        through that very model (draft_prefill through the fp32 graph the target shares with it:
        `net.prefill_model is model`), copy the prompt's K/V from the target's `cache` instead of
        computing it again. Returns whether it did; `start(prompt + [root])` then feeds the root."""
        n = len(prompt)
        if getattr(self.net, "prefill_model", None) is not model or n > cache.k.shape[3]:
            return False
        return self.adopt_kv(prompt, cache.k[:, 0, :, :n], cache.v[:, 0, :, :n])

    @torch.inference_mode()
    def adopt_kv(self, prompt: list[int], k: torch.Tensor, v: torch.Tensor) -> bool:
        """The prompt's K/V ([layers, kv_heads, n, head_dim]) as the target's fp32 graph computed
        it, where this draft would prefill `prompt` through that graph (draft_prefill): copied
        into cache row 0 instead of computed. False (nothing changed) when this draft would not
        prefill that way or the shapes are not its cache's."""
        n, dst = len(prompt), self.cache
        if self.prefill is None or n < self.prefill or n > dst.k.shape[3]:
            return False
        if tuple(k.shape) != (dst.k.shape[0], dst.k.shape[2], n, dst.k.shape[4]) or v.shape != k.shape:
            return False
        self.start(prompt)
        dst.k[:, 0, :, :n].copy_(k)
        dst.v[:, 0, :, :n].copy_(v)
        self.kv = n
        dst.set_length(0, n)
        self._warm = list(prompt)
        return True

    def _reset_window_state(self) -> None:
        self._branches = {}
        self._own = {}
        self._pre_rows = 0
        self._live = None

    def _record(self, j: int, logits: torch.Tensor) -> None:
        """The draft's top-k at window position j from [1, V'] (or [V']) logits."""
        if not self.own_k:
            return
        p = torch.softmax(logits.float().reshape(-1), -1)
        v, i = p.topk(min(self.own_k, p.shape[-1]))
        self._own[j] = (self.net.to_full(i).tolist(), v.tolist())

    @property
    def fed(self) -> int:
        """Window tokens with valid KV."""
        return max(0, self.kv - len(self.ctx))

    def _feed(self, tokens: list[int], start: int) -> torch.Tensor:
        """Write KV for tokens at positions start..; returns the last position's logits [1, V']."""
        logits = None
        if self.prefill is not None and start == 0 and len(tokens) >= self.prefill:  # the prompt, fp32
            logits = self.net.prefill(tokens, self.cache)
        else:
            for s in range(0, len(tokens), 512):  # chunked: the first call prefills the prompt
                chunk = torch.tensor([tokens[s:s + 512]])
                e = start + s + chunk.shape[1]
                logits = self.net(chunk, self.positions[:, start + s:e], self.cache, kv_len=e, last_only=True)[:, -1]
        self.kv = start + len(tokens)
        self.cache.set_length(0, self.kv)
        return logits

    # --- serial drafting ------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, gamma: int) -> DraftWindow:
        self._reset_window_state()
        n = len(self.ctx)
        logits = self._feed(self.ctx[self.kv:], self.kv)  # at least the root
        ids, probs = [], []
        for i in range(gamma):
            self._record(i, logits)
            tok, pr, conf = self._choose(logits, self.gen)
            self.stats.computed += 1
            if self.confidence and float(conf[0]) < self.confidence:
                break  # Kangaroo early stop
            ids.append(tok)
            if pr is not None:
                probs.append(pr)
            if i == gamma - 1:
                break
            # tok indexes the draft's (possibly VocabTrim'd) head: feed the token it stands for
            logits = self.net(self.net.to_full(tok).view(1, 1), self.positions[:, n + i:n + i + 1], self.cache,
                              kv_len=n + i + 1)[:, -1]
            self.kv = n + i + 1
        self.cache.set_length(0, self.kv)
        out_ids = self.net.to_full(torch.cat(ids)).tolist() if ids else []
        p = self.net.full_probs(torch.cat(probs), self.vocab) if probs else None
        self.window = DraftWindow(out_ids, p, self.name)
        self.stats.used += len(out_ids)
        return self.window

    def observe(self, window: DraftWindow) -> None:
        """Another drafter's window is being verified (combined drafts): our KV stops at ctx."""
        self.kv = min(self.kv, len(self.ctx))
        self.cache.set_length(0, self.kv)
        self.window = window
        self._reset_window_state()

    def commit(self, verdict: Verdict) -> None:
        self._observe(verdict)
        self.kv = min(self.kv, len(self.ctx)) + min(verdict.accepted, self.fed)
        self.cache.set_length(0, self.kv)
        super().commit(verdict)
        self._reset_window_state()

    # --- Mirror-SD branch rollouts ----------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, gamma: int = 0, budget: int = 0, should_stop=None, batch: int = 8, skip=None) -> int:
        """Every hypothesis (j, v) needs KV through d_j: feed the window tokens that lack it
        (d_G after serial drafting; a whole window that another drafter proposed). With a
        `budget` (SpecConfig.pre_budget), then expand that many hypotheses ranked by the draft's
        own distribution (`pre_expand`); returns how many."""
        n, G = len(self.ctx), len(self.window.ids)
        if self.kv < n + G:
            todo = (self.ctx + self.window.ids)[self.kv:]
            own = budget > 0 and any(j not in self._own for j in range(G + 1))
            if own and self._lazy and len(todo) <= 64:
                self._catch_up_lazy(should_stop)
            elif own and self.kv <= n + G - 1 and 1 < len(todo) <= 64:
                # logits at every fed window position: the draft's own view of the window
                start = self.kv
                logits = self.net(torch.tensor([todo]), self.positions[:, start:n + G], self.cache,
                                  kv_len=n + G)[0]
                self.kv = n + G
                self.cache.set_length(0, self.kv)
                for t in range(len(todo)):
                    j = start + t - (n - 1)  # the token at position p ends window position p - (n-1)
                    if 0 <= j <= G:
                        self._record(j, logits[t])
            else:
                last = self._feed(todo, self.kv)
                self._record(G, last)
        return self.pre_expand(gamma, budget, should_stop, batch, skip) if budget > 0 else 0

    # catch_up="lazy": window tokens fed by the first call (with the committed tokens not fed
    # yet) and by each later one
    CATCH_UP_FIRST, CATCH_UP_NEXT = 1, 2

    @property
    def _lazy(self) -> bool:
        """catch_up="lazy" applies (greedy only: it stops at the draft's own top-1)."""
        return self.catch_up == "lazy" and self.params.greedy

    def _disagreement(self) -> int | None:
        """The first window position j whose own top-1 is known and is not d_{j+1}, where the
        positions before it are known and agree; None when there is none so far."""
        for j, tok in enumerate(self.window.ids):
            own = self._own.get(j)
            if own is None:
                return None
            if own[0][0] != tok:
                return j
        return None

    def _catch_up_lazy(self, should_stop=None) -> None:
        """Feed the window in chunks, recording the own view at each fed position, until this
        draft's top-1 departs from the window (the target will most likely reject there too:
        the tokens after it are not worth a draft forward before the signal), the window is
        fed, or the verdict is here (`should_stop`)."""
        n, G = len(self.ctx), len(self.window.ids)
        seq = self.ctx + self.window.ids
        first = True
        while self.kv < n + G and self._disagreement() is None:
            if not first and should_stop is not None and should_stop():
                break
            start = self.kv
            end = min(n + G, max(start, n) + (self.CATCH_UP_FIRST if first else self.CATCH_UP_NEXT))
            first = False
            logits = self.net(torch.tensor([seq[start:end]]), self.positions[:, start:end], self.cache,
                              kv_len=end)[0]
            self.kv = end
            self.cache.set_length(0, end)
            for t in range(end - start):
                j = start + t - (n - 1)  # the token at position p ends window position p - (n-1)
                if 0 <= j <= G:
                    self._record(j, logits[t])

    def _observe(self, verdict: Verdict) -> None:
        """Greedy: count, at the window positions whose own top-k is known, whether the target's
        token there (d_{j+1} for j < A, then t) was the draft's own top-1."""
        if not self.params.greedy or not self._own:
            return
        got = self.window.ids[:verdict.accepted] + [verdict.token]
        for j, tok in enumerate(got):
            own = self._own.get(j)
            if own is not None:
                self.agree[0] += own[0][0] == tok
                self.agree[1] += 1

    def own_signal(self) -> EarlyExitSignal | None:
        """The draft's own top-k at window positions 0..G as an EarlyExitSignal (step -1), or
        None when a position's distribution is not known.

        Greedy verification emits the target's argmax, so the chance that the target's token is
        v is not the draft's p(v): with a draft close to the target the argmax agrees far more
        often than its probability says (a near copy of the target agrees ~95% of the time at a
        top-1 probability of 0.5). Then the top-1 gets the agreement rate measured so far on this
        request and the runners-up share the rest in proportion; without that, a runner-up at
        position 0 (p ~0.3) outranks the full window's acceptance (p ~0.8 per token, five times)."""
        G = len(self.window.ids)
        known = next((j for j in range(G + 1) if j not in self._own), G + 1)  # positions 0..known-1
        rows = 0
        if known <= G:  # a lazy catch-up stopped early: the positions up to the first departure
            stop = self._disagreement()
            if stop is None or not self.params.greedy:
                return None
            known, rows = stop + 1, stop + 1  # (rank_hypotheses: j < rows; pre_expand drops v = d_rows)
        ids = torch.tensor([self._own[j][0] for j in range(known)], dtype=torch.long)
        p = torch.tensor([self._own[j][1] for j in range(known)])
        if self.params.greedy:
            a = self.agree[0] / self.agree[1]
            rest = p[:, 1:] / (1.0 - p[:, :1]).clamp_min(1e-6)
            p = torch.cat([torch.full_like(p[:, :1], a), (1.0 - a) * rest], 1)
        return EarlyExitSignal(-1, ids, p.clamp_min(1e-30).log(), rows=rows)

    @torch.inference_mode()
    def pre_expand(self, gamma: int, budget: int, should_stop=None, batch: int = 8, skip=None) -> int:
        """Before the signal: expand hypotheses ranked by the draft's own distribution (own_signal:
        the whole window accepted and its own next token, or a runner-up at a window position,
        weighted by the draft's confidence in the tokens before),
        except those `skip(h)` rejects. They take branch rows 0..; `expand` adds the signal's
        hypotheses after them and skips these. Stops like `expand` (`should_stop`)."""
        sig = self.own_signal()
        if sig is None or gamma < 1:
            return 0
        hyps = rank_hypotheses(sig, self.window, self.max_rows)
        if sig.rows:  # a partial view: at its last position the window's own token is no correction
            hyps = [h for h in hyps if h.j >= len(self.window.ids) or h.token != self.window.ids[h.j]]
        if skip is not None:
            hyps = [h for h in hyps if not skip(h)]
        done = self._expand_batches(hyps[:min(budget, self.max_rows)], gamma, 0, batch, should_stop,
                                    first_always=False)
        self._pre_rows = done
        self.stats.branches += done
        self.stats.pre_branches += done
        return done

    @torch.inference_mode()
    def expand(self, signal: EarlyExitSignal, gamma: int, budget: int, should_stop=None,
               batch: int = 8, skip=()) -> int:
        """Expand the most likely hypotheses (j, v) - except those in `skip` - in batches of rows
        that share the committed prefix's KV. Anytime: between batches it stops once
        `should_stop()` is true (the target's verdict arrived), so the draft never delays the
        target."""
        if not self._lazy:
            self.prepare()  # usually done already, under the target's prefix
        pre = self._pre_rows  # rows 0..pre-1: hypotheses expanded before the signal (pre_expand)
        skip = set(skip) | set(self._branches)
        hyps = rank_hypotheses(signal, self.window, max(0, min(budget, self.max_rows - pre)), skip=skip)
        if self._lazy:  # the KV these hypotheses branch from: through d_j (positions < n + j)
            n = len(self.ctx)
            need = n + max((h.j for h in hyps), default=-1)
            if self.kv < need:
                self._feed((self.ctx + self.window.ids)[self.kv:need], self.kv)
        done = self._expand_batches(hyps, gamma, pre, batch, should_stop, first_always=not pre)
        self.stats.branches += done
        return done

    def _expand_batches(self, hyps, gamma: int, row0: int, batch: int, should_stop, first_always: bool) -> int:
        """Roll out `hyps` in batches of rows row0..; between batches stop once `should_stop()`
        (the first batch always runs when `first_always`: a verdict never finds nothing expanded)."""
        if hasattr(self.buf, "floor"):  # rows' scratch KV past the whole window, which a lazy
            self.buf.floor = len(self.ctx) + len(self.window.ids)  # catch-up may feed after them
        done = 0
        for b0 in range(0, len(hyps), batch):
            if should_stop is not None and (done or not first_always) and should_stop():
                break
            group = hyps[b0:b0 + batch]
            self._expand_rows(group, gamma, row0=row0 + b0, should_stop=should_stop)
            done += len(group)
        return done

    def _expand_rows(self, group, gamma: int, row0: int, should_stop=None) -> None:
        """One batch of hypothesis rows, up to `gamma` draft steps; when the verdict arrives
        mid-way (`should_stop`) the rows keep the tokens drafted so far - shorter windows,
        ready at once - so the draft overruns the verdict by at most one step."""
        R = len(group)
        n = len(self.ctx)  # root at n - 1, d_i at n - 1 + i, v of (j, v) at n + j
        prefix = torch.tensor([n + h.j for h in group])
        pos = prefix[:, None]
        s_main = int(prefix.max())
        logits = self.net.forward_branch(torch.tensor([[h.token] for h in group]), pos, self.cache, 0,
                                         prefix, self.buf, s_main, row0)
        toks, probs, tops = [], [], []
        alive = torch.ones(R, dtype=torch.bool)
        lengths = torch.zeros(R, dtype=torch.long)
        self._live = ([(h.j, h.token) for h in group], toks, lengths)  # what peek reads while this runs
        forwards = 1
        for i in range(gamma):
            if self.own_k:
                pt = torch.softmax(logits.float(), -1).topk(min(self.own_k, logits.shape[-1]))
                tops.append((self.net.to_full(pt.indices), pt.values))  # the new window's position i
            tok, pr, conf = self._choose(logits, self.gen)
            self.stats.computed += R
            if self.confidence:
                alive &= conf >= self.confidence
            lengths += alive.long()
            toks.append(self.net.to_full(tok))
            if pr is not None:
                probs.append(pr)
            if i == gamma - 1 or not bool(alive.any()) or (should_stop is not None and should_stop()):
                break
            pos = pos + 1
            logits = self.net.forward_branch(toks[-1][:, None], pos, self.cache, 0, prefix, self.buf,
                                             s_main, row0)
            forwards += 1
        ids = torch.stack(toks, 1).tolist()  # [R, steps]
        P = self.net.full_probs(torch.stack(probs, 1), self.vocab) if probs else None
        if tops:
            top_ids = torch.stack([t[0] for t in tops], 1).tolist()  # [R, steps, k]
            top_p = torch.stack([t[1] for t in tops], 1).tolist()
        for r, h in enumerate(group):
            m = int(lengths[r])
            fed = min(m, forwards - 1)  # d'_1..d'_fed were fed back: their KV exists
            w = DraftWindow(ids[r][:m], P[r, :m] if P is not None else None, self.name)
            own = {i: (top_ids[r][i], top_p[r][i]) for i in range(min(m + 1, len(tops)))}
            self._branches[(h.j, h.token)] = (int(prefix[r]), w, row0 + r, fed, own)
        self._live = None  # (the rollouts are in _branches now: peek and a filling verdict look there)

    def ready(self) -> dict[tuple[int, int], DraftWindow]:
        return {k: b[1] for k, b in self._branches.items()}

    def rolling(self, key: tuple[int, int]) -> int | None:
        """The window length so far of hypothesis `key`'s rollout while it runs; None when it is
        not running (read from another thread: SpecConfig.fill_window)."""
        live = self._live
        if live is None or key not in live[0]:
            return None
        return int(live[2][live[0].index(key)])

    def peek(self, verdict: Verdict) -> DraftWindow | None:
        key = (verdict.accepted, verdict.token)
        hit = self._branches.get(key)  # (read from another thread: one dict lookup each)
        if hit is not None:
            return hit[1] if hit[1].probs is None else None
        live = self._live
        if live is None or key not in live[0] or not self.params.greedy:
            return None
        keys, toks, lengths = live
        steps = list(toks)  # the steps appended so far (lengths may count one more, about to be)
        r = keys.index(key)
        m = min(int(lengths[r]), len(steps))
        return DraftWindow([int(t[r]) for t in steps[:m]], None, self.name) if m else None

    def take(self, verdict: Verdict, sent: DraftWindow | None = None) -> DraftWindow | None:
        hit = self._branches.get((verdict.accepted, verdict.token))
        self._branches = {}
        if sent is not None and (hit is None or hit[1].ids[:len(sent.ids)] != sent.ids):
            raise ValueError(f"the window sent for {(verdict.accepted, verdict.token)} is not its rollout's")
        if hit is None:
            self.stats.misses += 1
            return None  # (the caller commits: _observe runs there)
        self._observe(verdict)
        s, window, row, fed, own = hit
        if sent is not None and len(sent.ids) < len(window.ids):  # the rollout went on after the reply
            m = len(sent.ids)
            window, fed = DraftWindow(list(sent.ids), None, window.source), min(fed, m)
            own = {i: v for i, v in own.items() if i <= m}
        self.stats.hits += 1
        self.stats.pre_hits += row < self._pre_rows
        Drafter.commit(self, verdict)  # ctx += d_1..d_A, t (t is the branch's v, at position s)
        self.buf.install(row, self.cache, 0, s, 1 + fed)  # v, d'_1..d'_fed
        self.kv = s + 1 + fed
        self.cache.set_length(0, self.kv)
        self._reset_window_state()
        self._own = own
        self.window = window
        self.stats.used += len(window.ids)
        return window
