"""Training-free drafts by suffix lookup over the prompt and the output so far (SSSD-style).

The longest suffix of the context (ngram_max down to ngram_min tokens) that occurred before is
looked up in an index of n-gram -> latest end position; the tokens that followed it are the
draft. Deterministic proposals (one-hot), so they are lossless under every acceptance rule.
Mirror-SD branches are lookups too: each hypothesis context costs a dict probe.
"""
from __future__ import annotations

from ...sampling import SamplingParams
from ..messages import DraftWindow, EarlyExitSignal, Verdict
from .base import Drafter, rank_hypotheses


class NgramIndex:
    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self.tokens: list[int] = []
        self.table: dict[tuple[int, ...], int] = {}  # n-gram -> index right after its latest occurrence

    def extend(self, ids: list[int]) -> None:
        for t in ids:
            self.tokens.append(t)
            end = len(self.tokens)
            # index the n-grams ending *before* the newest token, so a hit always has a
            # continuation; the newest suffix gets indexed when the next token arrives
            for n in range(self.n_min, self.n_max + 1):
                if end - 1 - n >= 0:
                    self.table[tuple(self.tokens[end - 1 - n:end - 1])] = end - 1

    def lookup(self, ctx_tail: list[int], gamma: int, extra: list[int] = ()) -> list[int]:
        """Continuation of the longest matching suffix of (tokens + extra)."""
        seq = ctx_tail
        for n in range(min(self.n_max, len(seq)), self.n_min - 1, -1):
            at = self.table.get(tuple(seq[-n:]))
            if at is not None:
                return self.tokens[at:at + gamma]
        return []


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, params: SamplingParams, n_min: int = 2, n_max: int = 4):
        super().__init__(params)
        self.n_min, self.n_max = n_min, n_max
        self.index = NgramIndex(n_min, n_max)
        self._branches: dict[tuple[int, int], DraftWindow] = {}

    def start(self, ctx: list[int]) -> None:
        super().start(ctx)
        self.index = NgramIndex(self.n_min, self.n_max)
        self.index.extend(ctx)
        self._branches = {}

    def _draft_after(self, tail: list[int], gamma: int) -> DraftWindow:
        ids = self.index.lookup(tail, gamma)
        self.stats.computed += len(ids)
        return DraftWindow(list(ids), None, self.name)

    def propose(self, gamma: int) -> DraftWindow:
        self.window = self._draft_after(self.ctx[-self.n_max:], gamma)
        self.stats.used += len(self.window.ids)
        return self.window

    def commit(self, verdict: Verdict) -> None:
        new = self.window.ids[:verdict.accepted] + [verdict.token]
        super().commit(verdict)
        self.index.extend(new)
        self._branches = {}

    def expand(self, signal: EarlyExitSignal, gamma: int, budget: int, should_stop=None, batch: int = 8) -> int:
        self._branches = {}
        hyps = rank_hypotheses(signal, self.window, budget)
        tail = self.ctx[-self.n_max:]
        for h in hyps:
            ctx = (tail + self.window.ids[:h.j] + [h.token])[-self.n_max:]
            self._branches[(h.j, h.token)] = self._draft_after(ctx, gamma)
        self.stats.branches += len(hyps)
        return len(hyps)

    def take(self, verdict: Verdict) -> DraftWindow | None:
        w = self._branches.get((verdict.accepted, verdict.token))
        self._branches = {}
        if w is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.commit(verdict)
        self.window = w
        self.stats.used += len(w.ids)
        return w
