"""Acceptance rules: hand-built cases and statistical tests against the target distribution."""
import torch

from mirror.decoding.acceptance import greedy_accept, match_accept, stochastic_accept


def onehot_logits(ids, V=6):
    out = torch.full((len(ids), V), -5.0)
    for i, t in enumerate(ids):
        out[i, t] = 5.0
    return out


def test_greedy_full_accept_gives_bonus():
    d = torch.tensor([[1, 2, 3]])
    n, t = greedy_accept(d, onehot_logits([1, 2, 3, 4])[None])
    assert n.tolist() == [3] and t.tolist() == [4]


def test_greedy_early_mismatch_gives_correction():
    d = torch.tensor([[1, 5, 3]])
    n, t = greedy_accept(d, onehot_logits([1, 2, 3, 4])[None])
    assert n.tolist() == [1] and t.tolist() == [2]


def test_greedy_empty_draft_is_a_plain_step():
    n, t = greedy_accept(torch.zeros(1, 0, dtype=torch.long), onehot_logits([4])[None])
    assert n.tolist() == [0] and t.tolist() == [4]


def test_greedy_batched_with_variable_lengths():
    d = torch.tensor([[1, 2, 3], [1, 2, 3], [0, 2, 3]])
    logits = torch.stack([onehot_logits([1, 2, 3, 4])] * 3)
    n, t = greedy_accept(d, logits, lengths=torch.tensor([3, 2, 3]))
    assert n.tolist() == [3, 2, 0] and t.tolist() == [4, 3, 1]


def test_stochastic_accepts_everything_when_draft_equals_target():
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(64, 4, 6, generator=g), -1)
    d = torch.multinomial(q[:, :3].reshape(-1, 6), 1, generator=g).view(64, 3)
    n, _ = stochastic_accept(d, q[:, :3], q, torch.rand(64, 3, generator=g), torch.rand(64, generator=g))
    assert (n == 3).all()


def test_stochastic_rejects_impossible_token_and_never_resamples_it():
    q = torch.tensor([[[0.0, 0.5, 0.5, 0.0], [0.25] * 4]]).expand(500, 2, 4)
    p = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]]).expand(500, 1, 4)
    d = torch.zeros(500, 1, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    n, t = stochastic_accept(d, p, q, torch.rand(500, 1, generator=g), torch.rand(500, generator=g))
    assert (n == 0).all() and set(t.tolist()) == {1, 2}


def test_stochastic_empty_draft_samples_target():
    q = torch.tensor([[[0.0, 0.0, 1.0]]])
    n, t = stochastic_accept(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 3), q,
                             torch.rand(1, 0), torch.rand(1))
    assert n.tolist() == [0] and t.tolist() == [2]


def test_match_rule_hand_built():
    q = torch.stack([torch.eye(4)[[1, 2, 3]]])  # target deterministic: 1, 2, 3
    n, t = match_accept(torch.tensor([[1, 0]]), q, torch.rand(1, 3))
    assert n.tolist() == [1] and t.tolist() == [2]
    n, t = match_accept(torch.tensor([[1, 2]]), q, torch.rand(1, 3))
    assert n.tolist() == [2] and t.tolist() == [3]


CHI2_CRIT_DF4_P001 = 18.467  # chi-square critical value, 4 degrees of freedom, p = 0.001


def chi2(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=probs.numel()).float()
    expected = probs * samples.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def _setup(B=40000, V=5, G=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q1 = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    q2 = torch.tensor([0.1, 0.1, 0.3, 0.3, 0.2])
    q3 = torch.tensor([0.2] * 5)
    p1 = torch.tensor([0.05, 0.05, 0.1, 0.4, 0.4])  # a poor draft
    p2 = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1])
    q = torch.stack([q1, q2, q3])[None].expand(B, 3, V)
    p = torch.stack([p1, p2])[None].expand(B, 2, V)
    d = torch.stack([torch.multinomial(p1, B, replacement=True, generator=g),
                     torch.multinomial(p2, B, replacement=True, generator=g)], 1)
    return g, q, p, d


def committed(d, n, t):
    """First and second committed tokens per row (second only where the first was accepted)."""
    first = torch.where(n >= 1, d[:, 0], t)
    second = torch.where(n >= 2, d[:, 1], t)
    return first, second[n >= 1]


def test_stochastic_rule_follows_target_distribution():
    g, q, p, d = _setup()
    n, t = stochastic_accept(d, p, q, torch.rand(d.shape, generator=g), torch.rand(d.shape[0], generator=g))
    first, second = committed(d, n, t)
    assert chi2(first, q[0, 0]) < CHI2_CRIT_DF4_P001
    assert chi2(second, q[0, 1]) < CHI2_CRIT_DF4_P001
    # and it is not trivially sampling the draft
    assert chi2(d[:, 0], q[0, 0]) > 100


def test_match_rule_follows_target_distribution():
    g, q, p, d = _setup(seed=1)
    n, t = match_accept(d, q, torch.rand(d.shape[0], 3, generator=g))
    first, second = committed(d, n, t)
    assert chi2(first, q[0, 0]) < CHI2_CRIT_DF4_P001
    assert chi2(second, q[0, 1]) < CHI2_CRIT_DF4_P001


def test_a_wrong_rule_fails_the_same_test():
    """Sanity check of the test's power: committing the draft token unconditionally is caught."""
    g, q, p, d = _setup(seed=2)
    assert chi2(d[:, 0], q[0, 0]) > CHI2_CRIT_DF4_P001
