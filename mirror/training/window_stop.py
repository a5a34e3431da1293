"""`mirror calibrate-stop`: the n-gram window stop's table (decoding/drafters/window_stop.py).

1. Acceptance by token key: replay the target's greedy answers to held-out training prompts
   (a `mirror build-datastore --skip N` folder whose prompts the datastore never saw; never
   Spec-Bench) with full windows, and count for each drafted token that was reached (every token
   before it accepted) whether it was accepted, by its key.
2. Cost by window length: time the target's forward over T = 1..gamma+1 window tokens at a
   typical context on this machine (median of interleaved repeats), relative to T = 1, made
   non-decreasing (the true curve is; single timings are noisy).
"""
from __future__ import annotations

import random
import statistics
import time
from collections import defaultdict

import torch
from tqdm import tqdm

from ..decoding.drafters.ngram import NgramDrafter, NgramModel
from ..sampling import SamplingParams
from .replay import replay


def acceptance_counts(pairs, store: NgramModel | None, gamma: int, n_min: int = 2, n_max: int = 4,
                      progress: bool = True) -> tuple[dict[str, list[int]], dict]:
    """key -> [reached, accepted] over full-window replays of (prompt, answer) pairs, and the
    replay's steps/tokens."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    drafter = NgramDrafter(SamplingParams(), n_min, n_max, datastore=store, keyed=True)

    def observe(w, answer, pos, a):
        for k, key in enumerate(drafter.last_keys[:a + 1]):
            if pos + k >= len(answer):  # past the end of the answer: never verified
                break
            c = counts[key]
            c[0] += 1
            c[1] += int(k < a)

    steps = toks = 0
    for prompt, answer in tqdm(pairs, desc="replay", unit="answer", disable=not progress):
        s, t = replay(drafter, prompt, answer, gamma, observe)
        steps, toks = steps + s, toks + t
    return dict(counts), {"steps": steps, "tokens": toks, "tau": toks / max(steps, 1)}


@torch.inference_mode()
def measure_cost(model, t_max: int, reps: int = 15, context: int = 256, progress: bool = True) -> list[float]:
    """Target step time for windows of 1..t_max tokens, relative to 1 (see the module doc)."""
    cache = model.new_cache(1, context + t_max + 1)
    pos = torch.arange(context + t_max + 1, device=model.device)[None]
    g = torch.Generator().manual_seed(0)
    V = model.cfg.vocab_size
    model(torch.randint(0, V, (1, context), generator=g), pos[:, :context], cache, kv_len=context)
    times: dict[int, list[float]] = {T: [] for T in range(1, t_max + 1)}
    rng = random.Random(0)
    for _ in tqdm(range(reps + 1), desc="step cost", unit="round", disable=not progress):
        order = list(times)
        rng.shuffle(order)
        for T in order:
            cache.set_length(0, context)
            toks = torch.randint(0, V, (1, T), generator=g)
            t0 = time.perf_counter()
            model(toks, pos[:, context:context + T], cache, kv_len=context + T)
            times[T].append(time.perf_counter() - t0)
    med = {T: statistics.median(v[1:]) for T, v in times.items()}  # round 0 warms up
    out, hi = [], 0.0
    for T in range(1, t_max + 1):
        hi = max(hi, med[T] / med[1])
        out.append(round(hi, 4))
    return out

