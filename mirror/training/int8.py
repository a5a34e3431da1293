"""`mirror calibrate-int8`: activation statistics for the SmoothQuant int8 draft (models/quant.py).

The target reads training prompts (never Spec-Bench) in its chat template, followed by its own
greedy answers to them, and the per-input-channel max |x| entering every linear layer is kept.
Seeded: the same command gives the same file.
"""
from __future__ import annotations

import time

import torch

from ..models.llama import Transformer
from ..models.quant import DEFAULT_ALPHA, calibrate_act_max, save_calibration
from ..tokenizer import Tokenizer
from .corpus import encode_prompts, generate_with_features, load_prompts


def calibrate_int8(model: Transformer, tok: Tokenizer, data: str, out: str, *, prompts: int = 64,
                   max_new_tokens: int = 64, seed: int = 0, alpha: float = DEFAULT_ALPHA,
                   batch: int = 16, log=print) -> dict:
    t0 = time.perf_counter()
    texts = load_prompts(data, prompts, seed)
    ids = encode_prompts(tok, texts)
    seqs = ids
    if max_new_tokens > 0:
        eos = set(tok.eos_ids)
        seqs = []
        from tqdm import tqdm

        for i in tqdm(range(0, len(ids), batch), desc="target answers", unit="batch"):
            feats = generate_with_features(model, ids[i:i + batch], max_new_tokens, eos, layers=[], top_k=1)
            seqs += [f.ids.tolist() for f in feats]
    torch.manual_seed(seed)
    act = calibrate_act_max(model, seqs)
    meta = {"alpha": alpha, "prompts": len(seqs), "max_new_tokens": max_new_tokens, "seed": seed,
            "data": data, "n_layers": model.cfg.n_layers, "dim": model.cfg.dim}
    save_calibration(out, act, meta)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    log(f"wrote {out}: {len(act)} linear layers from {len(seqs)} sequences in {meta['seconds']} s")
    return meta
