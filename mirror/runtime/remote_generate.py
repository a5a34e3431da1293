"""Speculative decoding with the draft behind the token channel.

`RemoteDraftPipeline` gives a DraftChannelClient the interface of `DraftPipeline`, so the
decoding loop is `generate_speculative` itself - the same code as in-process, only the draft's
half of every rendezvous crosses gRPC:

    open (deferred) ----------------------------------------------> draft prefills the prompt
    target prefill (meanwhile)
    (or, with prompt_kv: target prefill on more cores, then its prompt K/V -> the draft takes it)
    first token ----------------------------------------------------> window 0
    target.prefix -> signal ---- send_signal (returns at once) ----> draft expands branches
    target.suffix (meanwhile)
    window's branches <-------------------------------------------- (pushed when the rollouts are done)
    verdict --------------------- send_verdict ---------------------> draft: stop, hit/miss
    hit among the pushed branches: its window, at once (Verdict.taken: the draft sends none)
    otherwise window <----------------------------------------------
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .. import trace
from ..decoding.drafters.base import DraftStats
from ..decoding.messages import DraftWindow, EarlyExitSignal, Verdict
from ..decoding.result import GenerationResult
from ..decoding.speculative import generate_speculative
from ..decoding.target import TargetPipeline
from ..sampling import SamplingParams
from ..spec_config import SpecConfig
from ..tokenizer import Tokenizer
from .channel import DraftChannelClient


class RemoteDraftPipeline:
    """DraftPipeline's methods over the channel. `drafter` is the pipeline itself because
    generate_speculative reads the draft's counters from `draft.drafter.totals()` once, after
    the loop; here that call closes the session and returns the counters the draft sent."""

    def __init__(self, client: DraftChannelClient, spec: SpecConfig, params: SamplingParams,
                 prompt_kv: bool = False):
        """`prompt_kv`: send the draft the prompt's K/V after the target's prefill rather than
        have it prefill the prompt meanwhile (Open.prompt_kv; the caller decides where it pays:
        TargetWorker._ships_prompt_kv)."""
        self.client, self.spec, self.params = client, spec, params
        self.prompt_kv = prompt_kv
        # Mirror-SD: the draft pushes its finished rollouts, so a hit needs no round trip
        self.push = spec.push_branches and spec.method == "mirror"
        self.drafter = self
        self._stats: DraftStats | None = None
        self._begun: list[int] | None = None  # the prompt of a deferred open

    def begin(self, prompt: list[int]) -> None:
        """Open the session before the target's prefill: the draft prefills the prompt meanwhile."""
        self.client.open(prompt, None, 0, self.spec, self.params, push_branches=self.push,
                         prompt_kv=self.prompt_kv)
        self._begun = list(prompt)

    def adopt(self, prompt: list[int], target) -> bool:
        """After the target's prefill: with prompt_kv, send the prompt's K/V from its cache (the
        draft takes them at First); otherwise nothing - the draft prefilled meanwhile."""
        if not self.prompt_kv or self._begun != list(prompt):
            return False
        with trace.span("channel.send_prompt_kv", "channel", tokens=len(prompt)):
            self.client.send_prompt_kv(target.cache, len(prompt))
        return True

    def start(self, ctx: list[int], gamma: int) -> DraftWindow:
        begun, self._begun = self._begun, None
        if begun is not None:
            if begun == ctx[:-1]:
                return self.client.first(ctx[-1], gamma)
            self.client.cancel()  # another prompt after all: a fresh session
        return self.client.open(ctx[:-1], ctx[-1], gamma, self.spec, self.params, push_branches=self.push)

    def prepare(self) -> None:
        """Nothing to send: the draft prepares on its own as soon as it has sent a window."""

    def on_signal(self, signal: EarlyExitSignal, should_stop=None) -> int:
        self.client.send_signal(signal)
        return 0  # the draft counts its branches; they arrive with totals()

    def on_verdict(self, verdict: Verdict, gamma: int) -> DraftWindow:
        return self.client.send_verdict(verdict, gamma)

    def totals(self) -> DraftStats:
        if self._stats is None:
            self._stats = self.client.close()
        return self._stats

    def release(self) -> None:
        """Free the draft's session if the loop ended without totals() (an error)."""
        self.client.cancel()


def generate_remote(target: TargetPipeline, client: DraftChannelClient, tokenizer: Tokenizer,
                    prompt_ids: list[int], params: SamplingParams, spec: SpecConfig,
                    on_chunk: Callable[[str, list[int]], None] | None = None,
                    should_stop: Callable[[], bool] | None = None, prompt_kv: bool = False) -> GenerationResult:
    """`generate_speculative` (sd or mirror) with the draft served by a DraftChannelServicer.

    `target` is this process's TargetPipeline (built with the same params and spec); the
    draft side builds its drafter from the spec and params sent in the session's Open.
    `prompt_kv`: the draft takes the prompt's K/V from `target`'s cache instead of prefilling it."""
    draft = RemoteDraftPipeline(client, spec, params, prompt_kv=prompt_kv)
    try:
        with torch.inference_mode():
            return generate_speculative(target, draft, tokenizer, prompt_ids, params, spec,
                                        on_chunk, should_stop)
    finally:
        draft.release()
