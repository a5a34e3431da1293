"""Training text for drafts: the target's own greedy answers to training prompts, plus the
target's teacher-forced outputs on them (what the draft must learn to predict).

Only `train_prompts.jsonl`-style files are read here; Spec-Bench is never used for training.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..models.llama import Transformer
from ..tokenizer import Tokenizer


def load_prompts(path: str, n: int, seed: int, max_chars: int = 1500) -> list[str]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if rows and "turns" in rows[0] and "prompt" not in rows[0]:
        raise ValueError(f"{path} looks like Spec-Bench (it has 'turns'): training on the benchmark is not allowed")
    rng = random.Random(seed)
    rng.shuffle(rows)
    return [r["prompt"][:max_chars] for r in rows[:n]]


@dataclass
class Features:
    """Target outputs for one sequence (prompt + the target's own greedy answer)."""

    ids: torch.Tensor  # [S]
    hidden: dict[int, torch.Tensor]  # layer -> [S, dim] fp16 hidden state entering that layer
    top_ids: torch.Tensor  # [S, K] target's top-K next-token ids at each position
    top_p: torch.Tensor  # [S, K] their probabilities (fp16)
    n_prompt: int


class _Recorder:
    """Runs the target layer-range by layer-range, keeping hidden states at chosen layers and
    the final top-K distribution: generation and feature extraction in one pass."""

    def __init__(self, model: Transformer, layers: list[int], top_k: int):
        self.m, self.layers, self.top_k = model, sorted(set(layers)), top_k

    def __call__(self, tokens, positions, cache, rows=None, kv_len=None):
        m = self.m
        h = m.embed(tokens)
        hidden, prev = {}, 0
        for layer in self.layers:
            h = m.forward_layers(h, positions, cache, prev, layer, rows, kv_len)
            hidden[layer] = h.half()
            prev = layer
        h = m.forward_layers(h, positions, cache, prev, m.cfg.n_layers, rows, kv_len)
        probs = torch.softmax(m.head(h).float(), -1)
        top = probs.topk(self.top_k, -1)
        return top.indices, top.values.half(), hidden


@torch.inference_mode()
def generate_with_features(model: Transformer, prompts: list[list[int]], max_new: int, eos: set[int],
                           layers: list[int], top_k: int) -> list[Features]:
    """Greedy answers for several prompts decoded together (one weight read per step for all
    rows; per-row positions, right-padded KV), recording the target's features on the way."""
    rec = _Recorder(model, layers, top_k)
    B = len(prompts)
    lens = [len(p) for p in prompts]
    cache = model.new_cache(B, max(lens) + max_new + 1)
    seq_ids = [list(p) for p in prompts]
    tops = [[] for _ in range(B)]
    probs = [[] for _ in range(B)]
    hid = [{l: [] for l in rec.layers} for _ in range(B)]
    nxt = torch.empty(B, dtype=torch.long)
    for r, p in enumerate(prompts):  # prefill rows one by one (different lengths)
        ti, tp, hs = rec(torch.tensor([p]), torch.arange(len(p))[None], cache, rows=range(r, r + 1), kv_len=len(p))
        tops[r].append(ti[0])
        probs[r].append(tp[0])
        for l in rec.layers:
            hid[r][l].append(hs[l][0])
        nxt[r] = ti[0, -1, 0]
    done = [False] * B
    pos = torch.tensor(lens)
    # Unfinished sequences occupy cache rows 0..n_active-1 and only they step: decoding here is
    # compute-bound (a batch of 16 rows costs far more than one weight read), so a finished row
    # is swapped behind the active ones (one copy of its KV) instead of stepping on for nothing.
    seq_at = list(range(B))  # cache row -> sequence
    row_of = list(range(B))  # sequence -> cache row
    n_active = B
    invariant, model.batch_invariant = model.batch_invariant, False  # speed; numerics need not match
    try:
        for _ in range(max_new):
            if not n_active:
                break
            active = seq_at[:n_active]
            idx = torch.tensor(active)
            for r, t in zip(active, nxt[idx].tolist()):
                seq_ids[r].append(t)
            ti, tp, hs = rec(nxt[idx][:, None], pos[idx][:, None], cache, rows=range(n_active),
                             kv_len=int(pos[idx].max()) + 1)
            for i, r in enumerate(active):
                tops[r].append(ti[i])
                probs[r].append(tp[i])
                for l in rec.layers:
                    hid[r][l].append(hs[l][i])
                done[r] = seq_ids[r][-1] in eos or len(seq_ids[r]) - lens[r] >= max_new
            nxt[idx] = ti[:, 0, 0]
            pos[idx] += 1
            for r in active:
                if done[r]:
                    i, j = row_of[r], n_active - 1
                    if i != j:
                        swap = torch.tensor([j, i])
                        cache.k[:, [i, j]] = cache.k[:, swap]
                        cache.v[:, [i, j]] = cache.v[:, swap]
                        s = seq_at[j]
                        seq_at[i], seq_at[j] = s, r
                        row_of[s], row_of[r] = i, j
                    n_active -= 1
    finally:
        model.batch_invariant = invariant
    return [Features(torch.tensor(seq_ids[r]), {l: torch.cat(hid[r][l]) for l in rec.layers},
                     torch.cat(tops[r]), torch.cat(probs[r]), lens[r]) for r in range(B)]


def encode_prompts(tok: Tokenizer, prompts: list[str], max_prompt_tokens: int = 256) -> list[list[int]]:
    """Training prompts as the target sees them: one user turn in its chat template (plain text
    without one), keeping the last `max_prompt_tokens` tokens."""
    out = []
    for p in prompts:
        ids = tok.encode_chat([{"role": "user", "content": p}]) if tok.chat_template else tok.encode(p)
        out.append(ids[-max_prompt_tokens:])
    return out


def build_features(model: Transformer, tok: Tokenizer, prompts: list[str], max_new: int, batch: int,
                   layers: list[int], top_k: int = 32, max_prompt_tokens: int = 256,
                   desc: str = "target answers") -> list[Features]:
    eos = set(tok.eos_ids)
    encoded = encode_prompts(tok, prompts, max_prompt_tokens)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths per batch
    feats: list[Features | None] = [None] * len(encoded)
    for b0 in tqdm(range(0, len(order), batch), desc=desc, unit="batch"):
        idx = order[b0:b0 + batch]
        for i, f in zip(idx, generate_with_features(model, [encoded[i] for i in idx], max_new, eos, layers, top_k)):
            feats[i] = f
    return feats
