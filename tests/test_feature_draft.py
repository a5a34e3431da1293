"""benchmarks/feature_draft.py: the batched replay of an EAGLE-style head equals drafting each
answer on its own, the context-draft replay counts steps exactly, and training learns."""
import torch
import torch.nn.functional as F

from benchmarks.feature_draft import (FeatureHead, LayerDraft, agreement, replay_context_draft,
                                      replay_feature_head, train)
from mirror.models.kv_cache import KVCache

from helpers import tiny_model

KEEP = torch.arange(0, 256, 32)  # an 8-token "VocabTrim" set: random drafts match often


def _data(target, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        P, A = 5 + i, 12 + 3 * i
        ids = torch.cat([torch.randint(0, 256, (P,), generator=g), KEEP[torch.randint(0, 8, (A,), generator=g)]])
        f = torch.randn(P + A, target.cfg.dim, generator=g)
        top = torch.cat([ids[1:], ids[:1]])[:, None]  # the "target" predicts the next token
        rows.append({"ids": ids, "f": f.half(), "top_ids": top, "top_p": torch.ones(P + A, 1).half(), "n_prompt": P})
    return rows


@torch.no_grad()
def _serial_tau(m, data, emb_w, W, keep, gamma):
    """One answer at a time, one cache row, no padding: the reference."""
    steps = toks = 0
    for r in data:
        ids, f = r["ids"], r["f"].float()
        S, p = len(ids), r["n_prompt"]
        cache = KVCache(1, 1, m.cfg.n_kv_heads, S + gamma + 2, m.cfg.head_dim, layers=range(1))
        kv = 0
        while p < S - 1:
            pos = torch.arange(kv + 1, p + 1)[None]
            fh = m.step(F.embedding(ids[kv + 1:p + 1], emb_w)[None], f[kv:p][None], pos, cache, range(1), p + 1)[:, -1:]
            kv = p
            d = []
            for k in range(gamma):
                tok = int(keep[F.linear(fh[0, 0], W).argmax()])
                d.append(tok)
                q = p + 1 + k
                fh = m.step(F.embedding(torch.tensor([[tok]]), emb_w), fh, torch.tensor([[q]]), cache, range(1), q + 1)
            A = 0
            while A < gamma and p + 1 + A < S and d[A] == int(ids[p + 1 + A]):
                A += 1
            steps += 1
            p = min(p + A + 1, S - 1)
        toks += S - 1 - r["n_prompt"]
    return toks / steps


def test_batched_feature_replay_matches_serial():
    target = tiny_model()
    torch.manual_seed(0)
    m = FeatureHead(target, ffn=64).eval()
    emb_w, W = target.tok_emb.weight, target.lm_head.weight[KEEP]
    data = _data(target)
    ref = _serial_tau(m, data, emb_w, W, KEEP, gamma=4)
    got = replay_feature_head(m, data, emb_w, W, KEEP, gamma=4)
    assert ref > 1.0  # some drafted tokens were accepted, so the comparison means something
    assert abs(got - ref) < 1e-9


def test_context_replay_counts_steps():
    target = tiny_model()
    data = _data(target, n=2)
    right = [r["ids"][r["n_prompt"] + 1:].tolist() for r in data]  # guess for answer token j + 1
    wrong = [[-5] * len(p) for p in right]
    answer_tokens = [len(p) for p in right]
    assert replay_context_draft(wrong, data, 5) == 1.0
    steps = sum(-(-n // 6) for n in answer_tokens)  # every window of 5 accepted + 1 bonus
    assert replay_context_draft(right, data, 5) == sum(answer_tokens) / steps


def test_training_raises_agreement():
    target = tiny_model()
    data = _data(target, n=4, seed=1)
    emb_w, W = target.tok_emb.weight.detach(), target.lm_head.weight.detach()[KEEP]
    lut = torch.full((256,), -1, dtype=torch.long)
    lut[KEEP] = torch.arange(len(KEEP))
    for variant, m in (("eagle", FeatureHead(target, ffn=64)), ("layers+f", LayerDraft(target, 2, True))):
        before, _ = agreement(variant, m, data, emb_w, W, KEEP)
        train(variant, m, data, emb_w, W, lut, epochs=30, lr=3e-3, accum=1)
        after, _ = agreement(variant, m, data, emb_w, W, KEEP)
        assert after > before + 0.2, (variant, before, after)
