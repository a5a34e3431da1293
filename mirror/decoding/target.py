"""The target pipeline: prefill, then per step either a full verification forward (vanilla SD)
or a layer-split forward - prefix to l_e, early-exit signal out, suffix, verdict (Mirror-SD).

Windows are `[root, d_1..d_G]` at positions n..n+G, where n is the target's KV length and the
root is the last committed token. After a verdict (A, t) the target KV keeps root, d_1..d_A
(n += A + 1) and t becomes the next root - a counter move, nothing copied.
"""
from __future__ import annotations

import logging

import torch

from .. import trace
from ..models.llama import Transformer
from ..sampling import SamplingParams, logits_to_probs, next_token
from ..spec_config import SpecConfig
from .acceptance import greedy_accept, match_accept, stochastic_accept
from .ar import check_context, prefill
from .messages import DraftWindow, EarlyExitSignal, Verdict
from .result import Metrics

log = logging.getLogger(__name__)


class EarlyExit:
    """The early-exit head: hidden state at l_e -> top-kappa ids and log-probs per position.

    The target's own final norm + LM head, optionally after a trained low-rank update
    (`ExitHead`) and optionally restricted to a VocabTrim set - the full head over 49K tokens is
    a fifth of a SmolLM2 step, so trimming it is what makes the early exit cheap."""

    def __init__(self, model: Transformer, kappa: int, trained=None, keep_ids: torch.Tensor | None = None,
                 quant: str = "none"):
        self.model, self.kappa, self.trained, self.keep = model, kappa, trained, keep_ids
        self.head = None
        # a graph-backed target runs a trimmed head as its own graph, on the target's threads
        self.graph = model.exit_head(keep_ids, kappa, trained, quant) \
            if keep_ids is not None and hasattr(model, "exit_head") else None
        if quant != "none" and self.graph is None:  # a speed setting: the head works without it
            log.warning("exit_quant %r applies to the onnx target backend (a trimmed head as an ONNX Runtime "
                        "graph); this target runs its layers in PyTorch and keeps the fp32 head", quant)
        if keep_ids is not None and self.graph is None:
            if not hasattr(model, "lm_head"):
                raise ValueError("a trimmed early-exit head needs an unsharded target (no tensor parallelism)")
            from .drafters.network import trimmed_head

            self.head = trimmed_head(model.lm_head, keep_ids)

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is not None:
            return self.graph(h)
        if self.trained is not None:
            h = self.trained.update(h)
        # the model's own head() when untrimmed: tensor-parallel drivers mirror that call
        logits = self.model.head(h) if self.head is None else self.head(self.model.norm(h))
        logp = torch.log_softmax(logits.float(), dim=-1)  # [G+1, V or |trim|]
        top = logp.topk(min(self.kappa, logp.shape[-1]), dim=-1)
        ids = top.indices if self.keep is None else self.keep[top.indices]
        return ids, top.values


class TargetPipeline:
    def __init__(self, model: Transformer, params: SamplingParams, spec: SpecConfig,
                 exit_head=None):
        self.model, self.params, self.spec = model, params, spec
        self.le = spec.resolve_exit_layer(model.cfg.n_layers)
        if spec.method == "mirror" and hasattr(model, "split_at"):
            model.split_at(self.le)  # a graph-backed target cuts its layers at the exit layer
        self.kappa = spec.kappa
        keep = None
        if spec.exit_trim:
            from ..models.bundled import resolve_artifact
            from .drafters.vocab_trim import VocabTrim

            keep = VocabTrim.load(resolve_artifact(spec.exit_trim, "vocab_trim")).keep_ids
        self.exit = EarlyExit(model, spec.kappa, exit_head, keep, spec.exit_quant)
        self.rule = "greedy" if params.greedy else ("stochastic" if spec.rule == "auto" else spec.rule)
        self.metrics = Metrics()
        self.step = 0

    # --- request lifecycle -------------------------------------------------------------------
    @trace.traced("target.start", "target")
    @torch.inference_mode()
    def start(self, prompt_ids: list[int]) -> int:
        """Prefill; returns the first committed token."""
        max_new = self.params.max_new_tokens
        check_context(self.model, len(prompt_ids), max_new, margin=self.spec.gamma + 1)
        self.cache = self.model.new_cache(1, len(prompt_ids) + max_new + self.spec.gamma + 2)
        self.positions = torch.arange(self.cache.max_len, device=self.model.device)[None]
        self.gen = self.params.generator(self.model.device)
        self.metrics = Metrics(prompt_tokens=len(prompt_ids))
        self.step = 0
        logits = prefill(self.model, self.cache, prompt_ids)
        self.n = len(prompt_ids)
        return int(next_token(logits, self.params, self.gen))

    def _window(self, root: int, window: DraftWindow):
        G = len(window.ids)
        self._pending = window
        self._tokens = torch.tensor([[root] + window.ids], device=self.model.device)
        self._pos = self.positions[:, self.n:self.n + G + 1]
        self._kv_len = self.n + G + 1
        return G

    # --- vanilla SD ----------------------------------------------------------------------------
    @trace.traced("target.verify", "target", args=lambda self, *a, **k: {"step": self.step})
    @torch.inference_mode()
    def verify(self, root: int, window: DraftWindow) -> Verdict:
        self._window(root, window)
        logits = self.model(self._tokens, self._pos, self.cache, kv_len=self._kv_len)[0]
        return self._conclude(logits, exit_top=None)

    # --- Mirror-SD -----------------------------------------------------------------------------
    @trace.traced("target.prefix", "target", args=lambda self, *a, **k: {"step": self.step})
    @torch.inference_mode()
    def prefix(self, root: int, window: DraftWindow) -> EarlyExitSignal:
        """Layers [0, l_e) over the window, then top-kappa of the early exit at every position."""
        self._window(root, window)
        m = self.model
        self._h = m.forward_layers(m.embed(self._tokens), self._pos, self.cache, 0, self.le, kv_len=self._kv_len)
        ids, logp = self.exit(self._h[0])  # [G+1, kappa] each
        self._exit_top = ids
        self._rows = self.verified_rows()
        cut = self._rows if self._rows <= len(window.ids) else 0
        return EarlyExitSignal(self.step, ids, logp, cut)

    @trace.traced("target.suffix", "target", args=lambda self, *a, **k: {"step": self.step})
    @torch.inference_mode()
    def suffix(self) -> Verdict:
        """Layers [l_e, N), acceptance, commit, rollback - over the window's first `rows` positions
        when `verify_cut` ends it where the early exit predicts the rejection."""
        m = self.model
        h, pos, kv_len = self._h, self._pos, self._kv_len
        rows = self._rows
        if rows < h.shape[1]:
            # prefix KV past `rows` is dead: the verdict keeps at most rows positions (n += A + 1)
            h, pos, kv_len = h[:, :rows], pos[:, :rows], self.n + rows
        h = m.forward_layers(h, pos, self.cache, self.le, m.cfg.n_layers, kv_len=kv_len)
        self._h = None
        return self._conclude(m.head(h)[0], exit_top=self._exit_top)

    def verified_rows(self) -> int:
        """How many window rows the suffix runs: all G+1, or with `verify_cut` = c the rows up to
        the first draft token d_j outside the early exit's top-c at its position j-1 (rows
        0..j-1: d_1..d_{j-1} verified, row j-1 gives the target's own token there). Exact: the
        target still picks every committed token; a cut that was wrong (the target would have
        taken d_j) only ends the window early, its last token then being the target's choice.
        Greedy, or windows without draft distributions (deterministic drafts), only: a cut that
        depends on sampled draft tokens would bias the stochastic acceptance rule."""
        w, c = self._pending, self.spec.verify_cut
        if not c or (self.rule != "greedy" and w.probs is not None):
            return len(w.ids) + 1
        top = self._exit_top[:len(w.ids), :c].tolist()
        for j, (d, cands) in enumerate(zip(w.ids, top)):
            if d not in cands:
                return j + 1
        return len(w.ids) + 1

    # --- shared --------------------------------------------------------------------------------
    def _conclude(self, logits: torch.Tensor, exit_top: torch.Tensor | None) -> Verdict:
        """logits [G+1, V] -> verdict; commits root + accepted tokens to the target KV."""
        w = self._pending
        G = logits.shape[0] - 1  # the window's tokens verified (fewer than drafted after a verify_cut)
        d = torch.tensor([w.ids[:G]], dtype=torch.long, device=logits.device)  # [1, G]
        if self.rule == "greedy":
            A, t = greedy_accept(d, logits[None])
        else:
            q = logits_to_probs(logits, self.params)[None]  # [1, G+1, V]
            if self.rule == "match":
                A, t = match_accept(d, q, torch.rand(1, G + 1, generator=self.gen, device=q.device))
            else:
                p = w.probs[:G] if w.probs is not None else \
                    torch.nn.functional.one_hot(d[0], q.shape[-1]).float()
                A, t = stochastic_accept(d, p[None].to(q.dtype), q,
                                         torch.rand(1, G, generator=self.gen, device=q.device),
                                         torch.rand(1, generator=self.gen, device=q.device))
        A, t = int(A[0]), int(t[0])  # the one host sync per step
        mt = self.metrics
        mt.target_steps += 1
        mt.drafted_tokens += len(w.ids)
        if G < len(w.ids):
            mt.cut_steps += 1
            mt.cut_tokens += len(w.ids) - G
            mt.cut_wrong += A == G and t == w.ids[G]
        mt.accepted_tokens += A
        if exit_top is not None:
            probs_A = torch.softmax(logits[A].float(), -1)
            mt.omega_total += 1
            mt.omega_mass += float(probs_A[exit_top[A]].sum())
            mt.omega_hits += int(bool((exit_top[A] == t).any()))
        self.n += A + 1
        self.cache.set_length(0, self.n)
        verdict = Verdict(self.step, A, t)
        self.step += 1
        return verdict
