"""Acceptance rules for speculative decoding: pure functions, vectorised over batch and window.

Inputs for a batch of B rows and a window of G draft tokens:
  draft_ids     [B, G]        the draft's proposal d_1..d_G (pad with any id past `lengths`)
  draft_probs   [B, G, V]     the distribution each d_i was drawn from (p)
  target_probs  [B, G+1, V]   the target's distribution at each window position (q); position i
                              predicts the token after d_1..d_i, position G gives the bonus
  lengths       [B]           how many of the G tokens are real (variable windows); default G
Outputs: (accepted [B] in 0..lengths, next_token [B]) - the correction at the first rejection,
or the bonus token after a fully accepted window. A step commits accepted + 1 tokens.

Nothing here calls a model, loops over tokens, or syncs with the host; randomness comes in as
uniforms so the functions are deterministic given their inputs.
"""
from __future__ import annotations

import torch


def _window_mask(draft_ids: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    B, G = draft_ids.shape
    if lengths is None:
        return torch.ones(B, G, dtype=torch.bool, device=draft_ids.device)
    return torch.arange(G, device=draft_ids.device)[None, :] < lengths[:, None]


def _count_prefix(ok: torch.Tensor) -> torch.Tensor:
    """Length of the all-True prefix of each row: [B, G] bool -> [B] long."""
    return ok.long().cumprod(dim=-1).sum(dim=-1)


def greedy_accept(draft_ids: torch.Tensor, target_logits: torch.Tensor,
                  lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept while d_i equals the target's argmax; next token = argmax at the first mismatch."""
    target_ids = target_logits.argmax(dim=-1)  # [B, G+1]
    return greedy_accept_ids(draft_ids, target_ids, lengths)


def greedy_accept_ids(draft_ids: torch.Tensor, target_ids: torch.Tensor,
                      lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    G = draft_ids.shape[1]
    ok = (draft_ids == target_ids[:, :G]) & _window_mask(draft_ids, lengths)
    n = _count_prefix(ok)
    return n, target_ids.gather(1, n[:, None]).squeeze(1)


def _sample_rows(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample of [B, V] (unnormalised) weights with uniforms u [B]."""
    cdf = probs.cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def stochastic_accept(draft_ids: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                      u_accept: torch.Tensor, u_sample: torch.Tensor,
                      lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The lossless rule (Leviathan et al., Chen et al.): accept d_i with prob min(1, q(d_i)/p(d_i));
    at the first rejection sample the normalised residual max(0, q - p); after a full accept
    sample the bonus from q at position G. u_accept [B, G], u_sample [B] ~ U[0, 1)."""
    B, G = draft_ids.shape
    q_d = target_probs[:, :G].gather(-1, draft_ids[..., None]).squeeze(-1)  # [B, G]
    p_d = draft_probs.gather(-1, draft_ids[..., None]).squeeze(-1)
    ok = (u_accept * p_d < q_d) & _window_mask(draft_ids, lengths)  # u < q/p without dividing
    n = _count_prefix(ok)
    rows = torch.arange(B, device=draft_ids.device)
    q_n = target_probs[rows, n]  # [B, V]
    full = lengths if lengths is not None else torch.full_like(n, G)
    rejected = n < full
    p_n = draft_probs[rows, n.clamp(max=G - 1)] if G > 0 else torch.zeros_like(q_n)
    residual = torch.clamp(q_n - p_n, min=0.0)
    # If the residual vanishes numerically (q == p), the rejection had probability ~0: use q.
    degenerate = residual.sum(-1) <= 0
    dist = torch.where((rejected & ~degenerate)[:, None], residual, q_n)
    return n, _sample_rows(dist, u_sample)


def match_accept(draft_ids: torch.Tensor, target_probs: torch.Tensor, u_sample: torch.Tensor,
                 lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's sample-and-match rule: draw t_i ~ q_i at every window position, accept while
    d_i == t_i, commit t at the first mismatch (or the bonus). Every committed token is a target
    sample, so it is lossless for any draft. u_sample [B, G+1]."""
    B, G1, V = target_probs.shape
    t = _sample_rows(target_probs.reshape(B * G1, V), u_sample.reshape(-1)).view(B, G1)
    return greedy_accept_ids(draft_ids, t, lengths)


RULES = ("greedy", "stochastic", "match")
