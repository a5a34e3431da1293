"""Vanilla speculative decoding and the Mirror-SD step, as two pipelines with a rendezvous.

Mirror-SD per step (see ../shared/MIRROR_SD.md):
  target: prefix [0, l_e) over [root, d_1..d_G] -> EarlyExitSignal ----> draft: expand branches
  target: suffix [l_e, N) -> acceptance -> Verdict --------------------> draft: hit -> window ready
                                                                               miss -> draft serially
Here the two pipelines run one after the other in one process; the distributed runtime runs
`DraftPipeline` in a draft worker and carries the same messages over gRPC, unchanged.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from .. import trace
from ..output import OutputStream
from ..sampling import SamplingParams
from ..spec_config import SpecConfig
from ..tokenizer import Tokenizer
from .drafters.base import Drafter
from .messages import DraftWindow, EarlyExitSignal, Verdict
from .result import GenerationResult
from .target import TargetPipeline


class DraftPipeline:
    """The draft side of the rendezvous: turns signals and verdicts into the next window."""

    def __init__(self, drafter: Drafter, spec: SpecConfig):
        self.drafter, self.spec = drafter, spec

    def begin(self, prompt: list[int]) -> None:
        """Called before the target's prefill. In one process there is nothing to overlap it
        with: the draft prefills in `start`. (Behind the channel, `RemoteDraftPipeline.begin`
        opens the session here, and the draft side runs `warm` while the target prefills.)"""

    @trace.traced("draft.warm", "draft")
    def warm(self, prompt: list[int]) -> None:
        """The draft's prompt prefill, before the first token is known."""
        self.drafter.warm(prompt)

    def adopt(self, prompt: list[int], target) -> bool:
        """After the target's prefill: the prompt's K/V from the target's cache where the draft
        would compute the very same (Drafter.adopt_prompt); in one process only."""
        return self.drafter.adopt_prompt(prompt, target.cache, target.model)

    @trace.traced("draft.start", "draft")
    def start(self, ctx: list[int], gamma: int) -> DraftWindow:
        self.drafter.start(ctx)
        return self.drafter.propose(gamma)

    @trace.traced("draft.prepare", "draft")
    def prepare(self, should_stop=None) -> int:
        """Mirror-SD, once the window is sent: work the rollouts need that does not depend on the
        signal (a network draft's KV for the window), done while the target runs its prefix, and
        with `spec.pre_budget` rollouts of hypotheses the draft ranks itself (until `should_stop`)."""
        t = time.perf_counter()
        n = self.drafter.prepare(self.spec.gamma, self.spec.pre_budget, should_stop, self.spec.branch_batch)
        self.drafter.stats.prepare_s += time.perf_counter() - t
        return n

    @trace.traced("draft.on_signal", "draft", args=lambda self, signal, *a, **k: {"step": signal.step})
    def on_signal(self, signal: EarlyExitSignal, should_stop=None) -> int:
        """Branch-complete rollouts for the most likely hypotheses, until the verdict arrives
        (`should_stop`) or the budget is spent."""
        t = time.perf_counter()
        n = self.drafter.expand(signal, self.spec.gamma, self.spec.budget, should_stop, self.spec.branch_batch)
        self.drafter.stats.expand_s += time.perf_counter() - t
        return n

    @trace.traced("draft.on_verdict", "draft", args=lambda self, verdict, *a, **k: {"step": verdict.step})
    def on_verdict(self, verdict: Verdict, gamma: int, sent: DraftWindow | None = None) -> DraftWindow:
        """Hit: the precomputed window, at zero latency. Miss: serial drafting (vanilla SD).
        `sent`: the window `peek` gave, already sent; the hit commits to exactly it."""
        t = time.perf_counter()
        w = self.drafter.take(verdict, sent) if self.spec.method == "mirror" else None
        if w is None and sent is not None:
            raise ValueError(f"verdict of step {verdict.step}: the window sent early is no hit")
        if w is None:
            self.drafter.commit(verdict)
            w = self.drafter.propose(gamma)
        self.drafter.stats.verdict_s += time.perf_counter() - t
        return w


def generate_speculative(target: TargetPipeline, draft: DraftPipeline, tokenizer: Tokenizer,
                         prompt_ids: list[int], params: SamplingParams, spec: SpecConfig,
                         on_chunk: Callable[[str, list[int]], None] | None = None,
                         should_stop: Callable[[], bool] | None = None) -> GenerationResult:
    if spec.method not in ("sd", "mirror"):
        raise ValueError(f"generate_speculative runs sd or mirror, not {spec.method!r}")
    out = OutputStream(tokenizer, params, on_chunk)
    t0 = time.perf_counter()
    draft.begin(prompt_ids)  # a remote draft prefills the prompt while the target does
    root = target.start(prompt_ids)
    t1 = time.perf_counter()

    def gamma_left() -> int:  # no point drafting past max_new_tokens
        return max(0, min(spec.gamma, params.max_new_tokens - len(out.ids) - 1))

    # where the step time goes, seen from the target (sums over steps; `window_s` is the wait
    # for the next window: draft work not hidden under the suffix, plus the channel)
    tm = {"prefix_s": 0.0, "suffix_s": 0.0, "verify_s": 0.0, "signal_s": 0.0, "window_s": 0.0, "first_window_s": 0.0}
    clock = time.perf_counter
    done = out.push([root])
    if not done:
        c = clock()
        draft.adopt(prompt_ids, target)
        window = draft.start(prompt_ids + [root], gamma_left())
        tm["first_window_s"] = clock() - c
    while not done:
        if should_stop is not None and should_stop():
            out.finish("cancelled")
            break
        c0 = clock()
        if spec.method == "mirror":
            draft.prepare()  # in one process the two pipelines take turns (see the module doc)
            signal = target.prefix(root, window)
            c1 = clock()
            trace.instant("channel.send_signal", "channel", step=signal.step)
            draft.on_signal(signal)
            c2 = clock()
            verdict = target.suffix()
            c3 = clock()
            tm["prefix_s"] += c1 - c0
            tm["signal_s"] += c2 - c1
            tm["suffix_s"] += c3 - c2
        else:
            verdict = target.verify(root, window)
            tm["verify_s"] += clock() - c0
        trace.instant("channel.send_verdict", "channel", step=verdict.step, accepted=verdict.accepted)
        committed = window.ids[:verdict.accepted] + [verdict.token]
        done = out.push(committed)
        root = verdict.token
        if not done:
            c4 = clock()
            window = draft.on_verdict(verdict, gamma_left())
            tm["window_s"] += clock() - c4
    m = target.metrics
    m.prefill_s = t1 - t0
    m.decode_s = time.perf_counter() - t1
    m.new_tokens = len(out.ids)
    st = draft.drafter.totals()
    m.draft_tokens_computed, m.draft_tokens_used = st.computed, st.used
    m.hits, m.misses = st.hits, st.misses
    m.extra["branches"] = st.branches
    if st.taken:  # behind the channel: hits whose window was already on the target's side
        m.extra["taken"] = st.taken
    if st.early:  # behind the channel: hits answered before their rollout stopped
        m.extra["early"] = st.early
    if st.pre_branches:
        m.extra["pre_branches"], m.extra["pre_hits"] = st.pre_branches, st.pre_hits
    m.extra["timing"] = tm
    m.extra["draft_timing"] = {"expand_s": st.expand_s, "overrun_s": st.overrun_s, "verdict_s": st.verdict_s,
                               "prepare_s": st.prepare_s}
    if st.by_source:
        m.extra["windows_by_source"] = dict(st.by_source)
    if hasattr(draft.drafter, "by_source"):
        m.extra["windows_by_source"] = dict(draft.drafter.by_source)
    return GenerationResult(out.ids, out.text, out.finish_reason, m, method=spec.method)
