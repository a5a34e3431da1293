"""Combined draft: n-gram lookup where the text repeats, a network draft elsewhere.

Per step the n-gram proposal is used when it finds a continuation - or, with `min_expected`,
only when the target is expected to accept at least that many of its tokens (the window's
`expected`, scored by the calibrated window-stop table: a long context match, not a unigram
datastore guess) - otherwise the network's.
Both drafters follow every commit, so either can take over at the next step; in Mirror-SD both
precompute branches (n-gram branches cost a dict probe) and the same preference applies."""
from __future__ import annotations

from ...sampling import SamplingParams
from ..messages import DraftWindow, EarlyExitSignal, Verdict
from .base import Drafter, DraftStats
from .network import NetworkDrafter
from .ngram import NgramDrafter


class CombinedDrafter(Drafter):
    def __init__(self, params: SamplingParams, ngram: NgramDrafter, net: NetworkDrafter,
                 min_expected: float = 0.0):
        super().__init__(params)
        if min_expected > 0 and ngram.score is None:
            raise ValueError("a combined draft's min_expected needs an n-gram drafter with a score table")
        self.ngram, self.net = ngram, net
        self.min_expected = min_expected
        self.name = f"ngram+{net.name}"
        self.by_source = {"ngram": 0, net.name: 0}

    def start(self, ctx: list[int]) -> None:
        super().start(ctx)
        self.ngram.start(ctx)
        self.net.start(ctx)
        self.by_source = {"ngram": 0, self.net.name: 0}

    def warm(self, prompt: list[int]) -> None:
        self.net.warm(prompt)  # the n-gram index is built in start (cheap)

    def adopt_prompt(self, prompt: list[int], cache, model) -> bool:
        return self.net.adopt_prompt(prompt, cache, model)  # the n-gram index is built in start

    def adopt_kv(self, prompt: list[int], k, v) -> bool:
        return self.net.adopt_kv(prompt, k, v)

    def totals(self):
        t = DraftStats(computed=self.ngram.stats.computed + self.net.stats.computed,
                       used=self.ngram.stats.used + self.net.stats.used,
                       hits=self.stats.hits, misses=self.stats.misses,
                       branches=self.net.stats.branches, by_source=dict(self.by_source),
                       expand_s=self.stats.expand_s, overrun_s=self.stats.overrun_s, verdict_s=self.stats.verdict_s,
                       prepare_s=self.stats.prepare_s, pre_branches=self.net.stats.pre_branches,
                       pre_hits=self.net.stats.pre_hits)
        return t

    def _prefer(self, w: DraftWindow | None) -> bool:
        """Is this n-gram window the one to send (rather than the network's)?"""
        if w is None or not w.ids:
            return False
        return self.min_expected <= 0 or (w.expected or 0.0) >= self.min_expected

    def _use(self, w: DraftWindow) -> DraftWindow:
        self.window = w
        self.by_source[w.source] = self.by_source.get(w.source, 0) + 1
        return w

    def propose(self, gamma: int) -> DraftWindow:
        w = self.ngram.propose(gamma)
        if self._prefer(w):
            self.net.observe(w)
            return self._use(w)
        self.ngram.stats.used -= len(w.ids)  # proposed, not sent
        w = self.net.propose(gamma)
        self.ngram.window = w
        return self._use(w)

    def commit(self, verdict: Verdict) -> None:
        super().commit(verdict)
        self.ngram.commit(verdict)
        self.net.commit(verdict)

    def prepare(self, gamma: int = 0, budget: int = 0, should_stop=None, batch: int = 8) -> int:
        """The network's window KV and, with a budget, its pre-signal rollouts - for the hypotheses
        the n-gram cannot continue (an n-gram branch made here is kept for `take`)."""
        return self.net.prepare(gamma, budget, should_stop, batch,
                                skip=lambda h: self._prefer(self.ngram.branch(h.j, h.token, gamma)))

    def expand(self, signal: EarlyExitSignal, gamma: int, budget: int, should_stop=None, batch: int = 8) -> int:
        """n-gram branches for every hypothesis (dict probes), network rollouts only for those the
        n-gram cannot continue: `take` prefers an n-gram window, so the network's would be unused."""
        self.ngram.expand(signal, gamma, budget)
        covered = {k for k, w in self.ngram._branches.items() if self._prefer(w)}
        return self.net.expand(signal, gamma, budget, should_stop, batch, skip=covered)

    def ready(self) -> dict[tuple[int, int], DraftWindow]:
        out = self.net.ready()  # take: the n-gram's window where preferred, else the network's
        out.update({k: w for k, w in self.ngram.ready().items() if self._prefer(w)})
        return out

    def rolling(self, key: tuple[int, int]) -> int | None:
        return self.net.rolling(key)  # (n-gram branches are made at once, never running)

    def peek(self, verdict: Verdict) -> DraftWindow | None:
        ng = self.ngram.peek(verdict)
        return ng if self._prefer(ng) else self.net.peek(verdict)

    def take(self, verdict: Verdict, sent: DraftWindow | None = None) -> DraftWindow | None:
        ng = self.ngram._branches.get((verdict.accepted, verdict.token))
        if sent is not None:  # peek's choice stands (an n-gram branch made since does not win)
            if sent.source == self.ngram.name and (ng is None or ng.ids != sent.ids):
                raise ValueError(f"the n-gram window sent for {(verdict.accepted, verdict.token)} is not its branch")
            if sent.source != self.ngram.name:
                ng = None
        if self._prefer(ng):
            # the n-gram continuation wins; the network just follows the commit
            self.net.commit(verdict)
            self.ngram.take(verdict)
            self.net.observe(ng)
            Drafter.commit(self, verdict)
            self.stats.hits += 1
            return self._use(ng)
        self.ngram._branches = {}
        w = self.net.take(verdict, sent)
        if w is None:  # miss: the caller commits and drafts serially
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.ngram.commit(verdict)
        self.ngram.window = w
        Drafter.commit(self, verdict)
        return self._use(w)
