"""What crosses between the target and draft pipelines each step (the rendezvous).

These are all that the token channel carries (protos/mirror/v1/channel.proto mirrors them):
token ids and a few floats, O(window * kappa) numbers, never hidden states.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class DraftWindow:
    """The draft's proposal d_1..d_G after the committed context (G may be 0)."""

    ids: list[int]
    # [G, V] distribution each d_i was drawn from, for stochastic acceptance; None means the
    # proposal is deterministic (one-hot), which is what greedy drafting and n-gram lookup give.
    probs: torch.Tensor | None = None
    source: str = ""  # which drafter produced it (for combined drafters' metrics)
    # the drafter's own estimate of how many of its tokens the target will accept (n-gram windows
    # scored by a calibrated window-stop table); None: no estimate. Stays on the draft side.
    expected: float | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(slots=True)
class EarlyExitSignal:
    """Target -> draft after the target prefix: top-kappa of p~_j for window positions j=0..G.

    Position j answers "which token follows root, d_1..d_j", i.e. the likely correction if the
    target rejects d_{j+1} (or the bonus when j = G)."""

    step: int
    top_ids: torch.Tensor  # [G+1, kappa] long
    top_logprobs: torch.Tensor  # [G+1, kappa] float
    # window rows the target's suffix verifies (SpecConfig.verify_cut: it ends the window at the
    # first draft token the exit ranks outside its top-c): verdicts then have A < rows, and at
    # A = rows - 1 < G the target's token may be d_rows itself; 0 = all G+1 rows
    rows: int = 0


@dataclass(slots=True)
class Verdict:
    """Target -> draft after the suffix: how many draft tokens were accepted and the next token
    (correction at the first rejection, or bonus after a full accept)."""

    step: int
    accepted: int
    token: int
