"""Feature-conditioned drafts on the bundled model: does the target's own top-layer hidden state
make a better draft than context alone? (EAGLE's premise, measured here before building on it.)

An EAGLE-style draft reads, besides the tokens, the target's last-layer feature of the previous
position (available after every verdict), and feeds its own predicted features along the chain.
This study trains, on the target's greedy answers to *training* prompts (never Spec-Bench):

  eagle      fc(rms(embedding), rms(feature)) -> one decoder block -> norm: a predicted feature,
             read by the target's (VocabTrim) LM head; loss = smooth-L1 on the feature + CE
  layers     the target's first k layers (copied, fine-tuned) -> norm -> head: context only
  layers+f   the same with the previous position's feature added to the input embedding
             through a zero-initialised projection (starts as `layers`)

and reports, on held-out training prompts, the top-1 agreement of the first drafted token with
the target (teacher-forced) and the tau of greedy vanilla SD at gamma, replayed exactly: for
`eagle` by drafting the whole chain with its own predicted features (batched over answers); for
`layers` from its teacher-forced predictions (a context-only draft, see benchmarks/draft_sim.py).

    python -m benchmarks.feature_draft --out runs/feature_draft            # ~1 h on 2 cores
    python -m benchmarks.feature_draft --out runs/fd --prompts 200 --holdout 40 --epochs 1  # quick
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mirror.models.kv_cache import KVCache
from mirror.models.llama import Block, StepContext
from mirror.models.ops import RMSNorm
from mirror.training.layers import block_train

VARIANTS = ("eagle", "layers", "layers+f")


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


# --- data ------------------------------------------------------------------------------------
def corpus(model, tok, data: str, n: int, skip: int, path: Path, batch: int = 32) -> list[dict]:
    """The target's greedy answers to training prompts skip..skip+n with, at every position, its
    final feature (post-norm hidden state, fp16) and top-8 next-token distribution. Cached."""
    from mirror.training.corpus import encode_prompts, generate_with_features, load_prompts

    if path.is_file():
        return torch.load(path, weights_only=False)
    texts = load_prompts(data, skip + n, 0)[skip:]
    enc = encode_prompts(tok, texts, 256)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    rows: list[dict | None] = [None] * len(enc)
    N = model.cfg.n_layers
    with torch.inference_mode():
        for b0 in tqdm(range(0, len(order), batch), desc=f"target answers ({path.stem})", unit="batch"):
            idx = order[b0:b0 + batch]
            feats = generate_with_features(model, [enc[i] for i in idx], 128, set(tok.eos_ids), [N], top_k=8)
            for i, f in zip(idx, feats):
                rows[i] = {"ids": f.ids, "f": model.norm(f.hidden[N].float()).half(), "top_ids": f.top_ids,
                           "top_p": f.top_p, "n_prompt": f.n_prompt}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rows, path)
    return rows


def soft_ce(logits: torch.Tensor, top_ids: torch.Tensor, top_p: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """CE of the draft against the target's top-k distribution, renormalised to the trimmed head."""
    logq = torch.log_softmax(logits.float(), -1)
    idx = lut[top_ids]
    p = top_p.float() * (idx >= 0)
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-9)
    return -(p * logq.gather(-1, idx.clamp(min=0))).sum(-1).mean()


# --- drafts ----------------------------------------------------------------------------------
class FeatureHead(nn.Module):
    """EAGLE-style head. Position i reads (token x_i, feature f_{i-1}) and predicts f_i."""

    def __init__(self, target, ffn: int = 1536):
        super().__init__()
        self.cfg = target.cfg.with_(ffn_dim=ffn)
        d = self.cfg.dim
        self.fc = nn.Linear(2 * d, d)
        self.block = Block(self.cfg, 0, torch.float32)
        with torch.no_grad():
            for name, p in self.block.named_parameters():
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.normal_(p, std=0.02)
        self.norm = RMSNorm(d, self.cfg.norm_eps)
        with torch.no_grad():
            self.norm.weight.copy_(target.norm.weight)
        # what StepContext reads off a model
        self.rope_cos, self.rope_sin, self.dtype, self.batch_invariant = target.rope_cos, target.rope_sin, torch.float32, False

    def inp(self, emb: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([_rms(emb), _rms(feat)], -1))

    def train_forward(self, emb: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """emb, feat [1, L, d] at positions 1..L -> predicted features [1, L, d]."""
        pos = torch.arange(1, emb.shape[1] + 1)
        return self.norm(block_train(self.block, self.inp(emb, feat), self.rope_cos[pos], self.rope_sin[pos], None))

    def step(self, emb, feat, positions, cache: KVCache, rows, kv_len: int) -> torch.Tensor:
        ctx = StepContext(self, positions, rows, kv_len)
        return self.norm(self.block(self.inp(emb, feat), ctx, cache))


class LayerDraft(nn.Module):
    """The target's first k layers, fine-tuned, optionally reading the previous feature."""

    def __init__(self, target, k: int, use_feature: bool):
        super().__init__()
        memo = {id(m._packed): None for m in target.modules() if getattr(m, "_packed", None) is not None}
        self.blocks = nn.ModuleList(copy.deepcopy(b, memo) for b in target.layers[:k])
        self.norm = copy.deepcopy(target.norm)
        self.requires_grad_(True)
        self.proj = None
        if use_feature:
            self.proj = nn.Linear(target.cfg.dim, target.cfg.dim)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        self.rope_cos, self.rope_sin = target.rope_cos, target.rope_sin

    def train_forward(self, emb: torch.Tensor, feat_prev: torch.Tensor) -> torch.Tensor:
        """emb [1, S, d] at positions 0..S-1, feat_prev [1, S, d] (f_{i-1}, zeros at 0) -> [1, S, d]."""
        x = emb if self.proj is None else emb + self.proj(feat_prev)
        pos = torch.arange(emb.shape[1])
        for b in self.blocks:
            x = block_train(b, x, self.rope_cos[pos], self.rope_sin[pos], None)
        return self.norm(x)


def _forward(variant: str, m: nn.Module, r: dict, emb_w: torch.Tensor, W: torch.Tensor):
    """(logits, predicted features or None, first index): logits[i] predicts ids[first + i + 1]."""
    ids, f = r["ids"], r["f"].float()
    if variant == "eagle":
        pf = m.train_forward(F.embedding(ids[1:], emb_w)[None], f[:-1][None])[0]
        return F.linear(pf, W), pf, 1
    prev = torch.cat([torch.zeros_like(f[:1]), f[:-1]])
    h = m.train_forward(F.embedding(ids, emb_w)[None], prev[None])[0]
    return F.linear(h, W), None, 0


def train(variant: str, m: nn.Module, data: list[dict], emb_w, W, lut, epochs: int, lr: float,
          accum: int = 8, seed: int = 0) -> float:
    torch.manual_seed(seed)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = math.ceil(len(data) / accum) * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    t0 = time.time()
    m.train()
    for ep in range(epochs):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + ep)).tolist()
        bar = tqdm(order, desc=f"{variant} epoch {ep + 1}/{epochs}", unit="seq", mininterval=5)
        run = None
        for i, idx in enumerate(bar):
            r = data[idx]
            logits, pf, first = _forward(variant, m, r, emb_w, W)
            loss = soft_ce(logits, r["top_ids"][first:], r["top_p"][first:], lut)
            if pf is not None:  # EAGLE's feature regression
                loss = loss + F.smooth_l1_loss(pf, r["f"].float()[1:])
            (loss / accum).backward()
            run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
            if (i + 1) % accum == 0 or i + 1 == len(order):
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                bar.set_postfix(loss=f"{run:.3f}")
    m.eval()
    return time.time() - t0


@torch.no_grad()
def agreement(variant: str, m, data, emb_w, W, keep) -> tuple[float, list[list[int]]]:
    """Teacher-forced top-1 agreement on answer tokens after the first, and the predictions
    (answer-aligned: preds[j] is the guess for answer token j + 1)."""
    ok = tot = 0
    preds = []
    for r in data:
        logits, _, first = _forward(variant, m, r, emb_w, W)
        a = r["n_prompt"]
        guess = keep[logits.argmax(-1)][a - first:len(r["ids"]) - 1 - first]  # predicts ids[a+1:]
        ok += int((guess == r["ids"][a + 1:]).sum())
        tot += len(r["ids"]) - a - 1
        preds.append(guess.tolist())
    return ok / max(tot, 1), preds


def replay_context_draft(preds: list[list[int]], data: list[dict], gamma: int) -> float:
    """Exact greedy-SD tau of a context-only draft from its teacher-forced predictions."""
    from benchmarks.draft_sim import ReplayNet
    from mirror.training.replay import replay

    steps = toks = 0
    for p, r in zip(preds, data):
        a = r["n_prompt"]
        answer = r["ids"][a:].tolist()
        s, t = replay(ReplayNet([-1] + p, a), r["ids"][:a].tolist(), answer, gamma)  # p[j]: answer token j + 1
        steps, toks = steps + s, toks + t
    return toks / max(steps, 1)


@torch.no_grad()
def replay_feature_head(m: FeatureHead, data: list[dict], emb_w, W, keep, gamma: int) -> float:
    """Exact greedy-SD tau of the EAGLE head, all answers at once (one cache row each).

    Each step a row feeds the positions committed since its last step with the target's true
    features (left-padded by repeating the first: the same KV written twice), then drafts gamma
    tokens with its own predicted features; accepted = the longest prefix equal to the answer."""
    B = len(data)
    S = torch.tensor([len(r["ids"]) for r in data])
    L = int(S.max()) + gamma + 2
    ids = torch.zeros(B, L, dtype=torch.long)
    feats = torch.zeros(B, L, m.cfg.dim)
    for b, r in enumerate(data):
        ids[b, :S[b]] = r["ids"]
        feats[b, :S[b]] = r["f"].float()
    cache = KVCache(1, B, m.cfg.n_kv_heads, L + 2, m.cfg.head_dim, layers=range(1))
    p = torch.tensor([r["n_prompt"] for r in data])  # root = ids[p], committed, not yet drafted from
    for b in range(B):  # prompt: positions 1..p-1 with true features
        n = int(p[b]) - 1
        if n > 0:
            m.step(F.embedding(ids[b, 1:n + 1], emb_w)[None], feats[b, :n][None], torch.arange(1, n + 1)[None],
                   cache, range(b, b + 1), n + 1)
    kv = p - 1
    steps = torch.zeros(B, dtype=torch.long)
    rows = torch.arange(B)
    offsets = torch.arange(gamma)[None]
    while True:
        active = p < S - 1
        if not bool(active.any()):
            break
        new = p - kv
        T = int(new.max())
        pos = kv[:, None] + 1 + (torch.arange(T)[None] - (T - new)[:, None]).clamp(min=0)  # [B, T]
        fh = m.step(F.embedding(ids.gather(1, pos), emb_w), feats[rows[:, None], pos - 1], pos, cache,
                    range(B), int(pos.max()) + 1)[:, -1:]
        kv = p.clone()
        drafted = []
        for k in range(gamma):
            tok = keep[F.linear(fh[:, 0], W).argmax(-1)]
            drafted.append(tok)
            if k + 1 < gamma:
                q = (p + 1 + k)[:, None]
                fh = m.step(F.embedding(tok[:, None], emb_w), fh, q, cache, range(B), int(q.max()) + 1)
        want = p[:, None] + 1 + offsets
        match = (torch.stack(drafted, 1) == ids.gather(1, want.clamp(max=L - 1))) & (want < S[:, None])
        A = match.long().cumprod(1).sum(1)
        steps += active.long()
        p = torch.where(active, torch.minimum(p + A + 1, S - 1), p)
    answer_tokens = int((S - 1 - torch.tensor([r["n_prompt"] for r in data])).sum())
    return answer_tokens / max(int(steps.sum()), 1)


def main(argv=None) -> int:
    from mirror.decoding.drafters.vocab_trim import VocabTrim
    from mirror.models import load_model
    from mirror.models.bundled import resolve_artifact
    from mirror.training.corpus import load_prompts  # noqa: F401  (training data only)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "train_prompts.jsonl"),
                    help="training prompts JSONL (default ../shared/data/train_prompts.jsonl; never Spec-Bench)")
    ap.add_argument("--out", default="runs/feature_draft")
    ap.add_argument("--prompts", type=int, default=1000, help="training prompts 0..N-1 of the seeded order")
    ap.add_argument("--holdout", type=int, default=150, help="held-out prompts, from --holdout-skip on")
    ap.add_argument("--holdout-skip", type=int, default=4000)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--layers", type=int, default=4, help="k for the layers variants")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    for name in ("prompts", "holdout", "layers", "epochs", "gamma", "threads"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name} must be positive")
    if not Path(args.data).is_file():
        ap.error(f"training prompts not found: {args.data} (pass --data)")
    torch.set_num_threads(args.threads)
    lm = load_model(None)
    t, tok = lm.model, lm.tokenizer
    keep = VocabTrim.load(resolve_artifact("bundled", "vocab_trim")).keep_ids
    W = t.lm_head.weight.detach()[keep]
    lut = torch.full((t.cfg.vocab_size,), -1, dtype=torch.long)
    lut[keep] = torch.arange(len(keep))
    emb_w = t.tok_emb.weight.detach()
    out = Path(args.out)
    train_set = corpus(t, tok, args.data, args.prompts, 0, out / f"train{args.prompts}.pt")
    hold = corpus(t, tok, args.data, args.holdout, args.holdout_skip, out / f"hold{args.holdout_skip}_{args.holdout}.pt")
    results = {"prompts": args.prompts, "train_positions": sum(len(r["ids"]) for r in train_set),
               "holdout": args.holdout, "gamma": args.gamma, "epochs": args.epochs, "variants": {}}
    for v in args.variants:
        m = FeatureHead(t) if v == "eagle" else LayerDraft(t, args.layers, v == "layers+f")
        secs = train(v, m, train_set, emb_w, W, lut, args.epochs, 1e-3 if v == "eagle" else 3e-4)
        agree, preds = agreement(v, m, hold, emb_w, W, keep)
        tau = replay_feature_head(m, hold, emb_w, W, keep, args.gamma) if v == "eagle" else \
            (replay_context_draft(preds, hold, args.gamma) if v == "layers" else None)
        results["variants"][v] = {"first_token_agreement": agree, "tau": tau, "train_s": secs}
        print(json.dumps({v: results["variants"][v]}))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
