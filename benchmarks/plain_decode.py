"""Plain greedy decoding speed of a model next to its memory-bandwidth bound.

    python -m benchmarks.plain_decode [--model PATH] [--dtypes fp32 bf16] [--tokens 128]

The bound is (weight bytes read per decoded token) / (measured copy bandwidth): a decode step
reads every weight matrix once (the tied LM head counts as a second read of the embedding) and
one embedding row. Copy bandwidth is bytes copied per second between two 1 GiB buffers with
the same thread count, i.e. STREAM "copy" counting each byte once.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

PROMPTS = [
    "Explain how a refrigerator works.",
    "Write a short poem about autumn leaves.",
    "What are the main causes of the French Revolution?",
]


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    n = int(gib * (1 << 30)) // 4
    a = torch.ones(n)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return n * 4 / best


def decode_speed(lm, tokens: int) -> dict:
    from mirror.decoding.ar import generate_ar
    from mirror.sampling import SamplingParams

    tok = lm.tokenizer
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    warm = tok.encode_chat([{"role": "user", "content": "Hi"}])
    generate_ar(lm.model, tok, warm, SamplingParams(max_new_tokens=8, ignore_eos=True))
    rates = []
    for p in PROMPTS:
        res = generate_ar(lm.model, tok, tok.encode_chat([{"role": "user", "content": p}]), params)
        rates.append(res.metrics.new_tokens / res.metrics.decode_s)
    return {"tok_s": sum(rates) / len(rates), "per_prompt": rates}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)
    from mirror.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    bw = copy_bandwidth()
    out = {"threads": torch.get_num_threads(), "copy_bandwidth_GBps": bw / 1e9, "runs": []}
    print(f"threads {out['threads']}, copy bandwidth {bw / 1e9:.1f} GB/s")
    for name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        lm = load_model(args.model, dtype=dtype)
        wbytes = lm.model.weight_bytes_per_token()
        bound = bw / wbytes
        r = decode_speed(lm, args.tokens)
        row = {"dtype": name, "weight_MB_per_token": wbytes / 1e6, "bound_tok_s": bound,
               "tok_s": r["tok_s"], "fraction_of_bound": r["tok_s"] / bound, "per_prompt": r["per_prompt"]}
        out["runs"].append(row)
        print(f"{name}: {r['tok_s']:.1f} tok/s greedy; bound {bound:.1f} tok/s "
              f"({wbytes / 1e6:.0f} MB/token at {bw / 1e9:.1f} GB/s) -> {100 * row['fraction_of_bound']:.0f}% of bound")
        del lm
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
