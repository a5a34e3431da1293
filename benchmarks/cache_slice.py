"""The onnx target attending over a slice of its KV cache against the whole cache row.

    python -m benchmarks.cache_slice [--threads 2] [--reps 5]

`OrtTarget` feeds a call only the cache positions it can see when that is cheaper: a prefill
chunk (>= `OrtTarget.SLICE_ROWS` tokens), or any call while the cache is at most half used
(short prompt, long `max_new_tokens`). Otherwise its graphs copy the whole cache row
(ScatterElements) and attend over every position, masked or not. Both give bit-identical results
(checked here on every case, and in tests/test_ort_target.py); this measures what the slice saves
on the bundled model: the prefill of a long prompt into a cache sized for 128 new tokens (as
`mirror generate` and the bench size it) and 1- and 6-token steps at a few (context, cache
length) points. The two ways alternate, `--reps` rounds, median milliseconds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="alternating rounds (prefill: one run per round)")
    ap.add_argument("--steps", type=int, default=9, help="timed calls per decode case and round")
    args = ap.parse_args(argv)

    from mirror.decoding.ar import prefill
    from mirror.models.loader import load_model
    from mirror.models.ort_target import OrtTarget, host_threads

    torch.set_num_threads(args.threads)
    target = OrtTarget(load_model(tokenizer=False).model, threads=args.threads)
    rule = OrtTarget._attended
    ways = {"whole row": lambda self, max_len, needed, rows: max_len, "slice": rule}
    ids = torch.randint(100, 40000, (1, 2100), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(2100)[None]
    # (label, prompt tokens, cache length, rows per call; 0 = the prefill itself)
    cases = [("prefill 740 tokens, cache 869", 740, 869, 0), ("prefill 300 tokens, cache 429", 300, 429, 0)]
    for ctx, S in ((20, 2070), (200, 600), (800, 934)):
        cases += [(f"step at {ctx}, cache {S}, {T} token{'s' * (T > 1)}", ctx, S, T) for T in (1, 6)]
    times: dict[str, dict[str, list[float]]] = {c[0]: {w: [] for w in ways} for c in cases}
    same = True
    try:
        with host_threads(1), torch.inference_mode():
            for _ in tqdm(range(args.reps), desc="rounds"):
                for label, n, S, T in cases:
                    outs = {}
                    for way, fn in ways.items():
                        OrtTarget._attended = fn
                        cache = target.new_cache(1, S)
                        t0 = time.perf_counter()
                        out = prefill(target, cache, ids[0, :n].tolist())
                        if T == 0:
                            times[label][way].append(time.perf_counter() - t0)
                        else:
                            for _ in range(args.steps):
                                t0 = time.perf_counter()
                                out = target(ids[:, n:n + T], pos[:, n:n + T], cache)
                                times[label][way].append(time.perf_counter() - t0)
                        outs[way] = (out, cache.k, cache.v)
                    a, b = outs.values()
                    same &= all(torch.equal(x, y) for x, y in zip(a, b))
    finally:
        OrtTarget._attended = rule
    rows = {}
    print(f"{'case':40s} {'whole row':>10s} {'slice':>9s} {'ratio':>6s}   (median ms, {args.threads} threads)")
    for label in times:
        w, s = (statistics.median(times[label][k]) * 1e3 for k in ways)
        rows[label] = {"whole_ms": w, "slice_ms": s, "whole_over_slice": w / s}
        print(f"{label:40s} {w:10.1f} {s:9.1f} {w / s:5.2f}x")
    print(f"bit-identical logits and cache in every case: {same}")
    return {"cases": rows, "identical": same}


if __name__ == "__main__":
    main()
