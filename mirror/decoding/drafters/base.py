"""The drafter interface shared by vanilla SD and Mirror-SD.

A drafter follows the committed context `ctx` (prompt + output; its last token is the *root*:
committed, not yet in the target's KV). Per step:

  window = propose(gamma)          # serial drafting from ctx (vanilla SD; Mirror-SD's fallback)
  expand(signal, window)           # Mirror-SD only: precompute branch-complete rollouts for
                                   #   hypotheses (j, v) while the target finishes its layers
  hit = take(verdict)              # Mirror-SD: the next window if (A, t) was precomputed
  commit(verdict)                  # otherwise: ctx += d_1..d_A, t and roll back draft state
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

from ...sampling import SamplingParams
from ..messages import DraftWindow, EarlyExitSignal, Verdict


@dataclass(slots=True)
class DraftStats:
    computed: int = 0  # draft tokens produced (windows and branches)
    used: int = 0  # tokens of windows handed to the target
    hits: int = 0
    misses: int = 0
    branches: int = 0  # hypotheses expanded
    by_source: dict = field(default_factory=dict)
    # draft-side time (seconds): branch rollouts, rollouts still running after the verdict
    # arrived (they finish their batch), and turning a verdict into the next window
    expand_s: float = 0.0
    overrun_s: float = 0.0
    verdict_s: float = 0.0
    prepare_s: float = 0.0  # Mirror-SD: KV for the window just sent (+ pre-signal rollouts), during the target's prefix
    pre_branches: int = 0  # hypotheses expanded before the signal (SpecConfig.pre_budget)
    pre_hits: int = 0  # hits on those
    taken: int = 0  # behind the channel: hits whose window the target took from pushed branches
    early: int = 0  # behind the channel: hits answered before their rollout stopped (rollout_stop="reply")


@dataclass(slots=True)
class Hypothesis:
    j: int  # accept d_1..d_j
    token: int  # then the target emits this
    score: float


def rank_hypotheses(signal: EarlyExitSignal, window: DraftWindow, budget: int,
                    floor: float = 1e-3, skip=()) -> list[Hypothesis]:
    """Hypotheses (j, v) in order of estimated probability, at most `budget`.

    P(accept d_1..d_j, then v) ~ prod_{i<=j} p~_{i-1}(d_i) * p~_j(v), all read off the target's
    early exit; a d_i outside position i-1's top-kappa gets `floor`. v = d_{j+1} is skipped: it
    would have been accepted, not emitted as a correction; so are the (j, v) in `skip`. When the
    target verifies only `signal.rows` rows (verify_cut), j stops at rows - 1, where v = d_rows is
    a possible verdict too (the window ended there, the target's own token is the draft's)."""
    ids = signal.top_ids.tolist()  # one host transfer per step
    probs = signal.top_logprobs.exp().tolist()
    G = len(window.ids)
    rows = signal.rows or G + 1
    heap: list[tuple[float, int, int]] = []
    survive = 1.0
    for j in range(min(rows, G + 1)):
        nxt = window.ids[j] if j < rows - 1 else None
        seen = set()
        for v, p in zip(ids[j], probs[j]):
            if v != nxt and v not in seen and (j, v) not in skip:
                seen.add(v)
                heap.append((-survive * p, j, v))
        if j < G:
            row = dict(zip(ids[j], probs[j]))
            survive *= max(row.get(window.ids[j], 0.0), floor)
    best = heapq.nsmallest(budget, heap)
    return [Hypothesis(j, v, -s) for s, j, v in best]


class Drafter:
    name = "drafter"

    def __init__(self, params: SamplingParams):
        self.params = params
        self.ctx: list[int] = []
        self.window = DraftWindow([])
        self.stats = DraftStats()

    # --- vanilla path ----------------------------------------------------------------------
    def start(self, ctx: list[int]) -> None:
        """Begin a request; ctx = prompt + first committed token (the root)."""
        self.ctx = list(ctx)
        self.window = DraftWindow([])

    def warm(self, prompt: list[int]) -> None:
        """The prompt, before the first token is known (the target is still prefilling): work
        `start(prompt + [root])` can then skip. A network draft prefills the prompt's KV here."""

    def adopt_prompt(self, prompt: list[int], cache, model) -> bool:
        """In one process: take the prompt's K/V from the target's cache (`model` filled it) if
        this draft's prompt state is that very K/V; returns whether it did (a network draft
        prefilling through the target's fp32 graph, NetworkDrafter.adopt_prompt)."""
        return False

    def adopt_kv(self, prompt: list[int], k, v) -> bool:
        """Behind the channel: the prompt's K/V as the target computed it (k, v [layers, kv_heads,
        len(prompt), head_dim]), sent where this draft would prefill through the same fp32
        graph (Open.prompt_kv); returns whether it took them (else it prefills in `warm`)."""
        return False

    def propose(self, gamma: int) -> DraftWindow:
        raise NotImplementedError

    def commit(self, verdict: Verdict) -> None:
        """ctx += d_1..d_A, t; drop the rest of the window."""
        self.ctx.extend(self.window.ids[:verdict.accepted])
        self.ctx.append(verdict.token)
        self.window = DraftWindow([])

    # --- Mirror-SD path --------------------------------------------------------------------
    def prepare(self, gamma: int = 0, budget: int = 0, should_stop=None, batch: int = 8) -> int:
        """After the window went out, before the signal: state work the rollouts need (a network
        draft writes the window's KV), done while the target runs its prefix layers; with a
        `budget`, also rollouts for up to that many hypotheses the drafter ranks itself (network
        drafts: SpecConfig.pre_budget). Returns how many were expanded."""
        return 0

    def expand(self, signal: EarlyExitSignal, gamma: int, budget: int, should_stop=None) -> int:
        """Precompute next windows for the most likely hypotheses; returns how many."""
        return 0

    def take(self, verdict: Verdict, sent: DraftWindow | None = None) -> DraftWindow | None:
        """If (A, t) was precomputed, commit it and return the ready next window. `sent`: the
        window `peek` gave for this verdict, already on its way to the target; the hit then
        returns exactly it (a rollout that went on since is cut back to it)."""
        return None

    def peek(self, verdict: Verdict) -> DraftWindow | None:
        """The window a hit on (A, t) has so far - a finished rollout's, or the tokens a greedy
        rollout still running has drafted (at least one) - or None. Called from another thread
        while rollouts run (SpecConfig.rollout_stop="reply"); `take(verdict, sent=...)` with its
        answer, once they stopped, then commits to exactly that window."""
        return None

    def ready(self) -> dict[tuple[int, int], DraftWindow]:
        """The windows `take` would return now, by hypothesis (A, t): what the draft worker can
        push to the target before the verdict (Open.push_branches)."""
        return {}

    def close(self) -> None:
        pass

    def totals(self) -> DraftStats:
        return self.stats

    # --- helpers ---------------------------------------------------------------------------
    def _choose(self, logits: torch.Tensor, gen: torch.Generator | None):
        """Pick draft tokens from [R, V'] logits -> (ids [R], probs [R, V'] or None, conf [R])."""
        from ...sampling import logits_to_probs, sample

        if self.params.greedy:
            p = torch.softmax(logits.float(), -1)
            conf, ids = p.max(-1)
            return ids, None, conf
        probs = logits_to_probs(logits, self.params)
        ids = sample(probs, gen)
        return ids, probs, probs.gather(-1, ids[:, None]).squeeze(-1)
