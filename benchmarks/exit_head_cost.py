"""The early-exit head's cost per Mirror-SD step: PyTorch (eager) against the onnx target's graph.

    python -m benchmarks.exit_head_cost [--threads 2] [--rows 6] [--kappa 8] [--reps 200] [--evict-mb 64]

The shipped exit head (`exit_head: bundled`, a rank-64 update) and exit trim (`exit_trim:
bundled`, 8192 token ids) on the bundled model, over `--rows` hidden states (a window of gamma +
1 = 6 positions by default): `EarlyExit`'s PyTorch path on one host thread (how the onnx target's
process runs host-side ops), and the same head as an ONNX Runtime graph on the target's
`--threads`-thread pool (`OrtTarget.exit_head`, what Mirror-SD runs on the onnx target). Median
milliseconds per call, and whether both give the same top-kappa ids; and the graph with its
weights as 8-bit blocks (`exit_quant: int8`), with how many of its top-kappa ids are the fp32
graph's. In a Mirror-SD step the head runs right after the prefix layers have streamed ~360 MB
through the caches, so its rows come from memory: `--evict-mb N` reads an N MB buffer before
every call to time it that way (0: the head stays in cache between calls).
"""
from __future__ import annotations

import argparse

import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="the onnx target's threads")
    ap.add_argument("--rows", type=int, default=6)
    ap.add_argument("--kappa", type=int, default=8)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--evict-mb", type=int, default=64, help="MB read before each call (0: warm caches)")
    args = ap.parse_args(argv)

    from mirror.decoding.artifacts import load_exit_head
    from mirror.decoding.drafters.vocab_trim import VocabTrim
    from mirror.decoding.target import EarlyExit
    from mirror.models.bundled import resolve_artifact
    from mirror.models.loader import load_model
    from mirror.models.ort_target import OrtTarget, host_threads

    from .exit_profile import _median_time

    torch.set_num_threads(args.threads)
    model = load_model(tokenizer=False).model
    target = OrtTarget(model, threads=args.threads)
    keep = VocabTrim.load(resolve_artifact("bundled", "vocab_trim")).keep_ids
    trained = load_exit_head(resolve_artifact("bundled", "exit_head"), model)
    h = torch.randn(args.rows, model.cfg.dim, generator=torch.Generator().manual_seed(0)) * 3
    junk = torch.ones(args.evict_mb << 18)  # float32: 4 bytes each

    def evicting(head):
        def call():
            if args.evict_mb:
                junk.sum()
            head(h)
        return call

    out = {}
    with host_threads(1), torch.inference_mode():
        eager, graph = EarlyExit(model, args.kappa, trained, keep), EarlyExit(target, args.kappa, trained, keep)
        q8 = EarlyExit(target, args.kappa, trained, keep, quant="int8")
        evict = _median_time(lambda: junk.sum(), args.reps, warm=2) if args.evict_mb else 0.0
        for name, head in (("pytorch, 1 host thread", eager), (f"onnx graph, {args.threads} threads", graph),
                           (f"onnx graph int8, {args.threads} thr", q8)):
            out[name] = (_median_time(evicting(head), args.reps, warm=5) - evict) * 1e3
        ids, ids8 = graph(h)[0], q8(h)[0]
        same = torch.equal(eager(h)[0], ids)
        overlap = sum(len(set(a) & set(b)) for a, b in zip(ids.tolist(), ids8.tolist())) / ids.numel()
    for name, ms in out.items():
        print(f"{name:28s} {ms:6.2f} ms per call ({args.rows} rows, trim {len(keep)}, kappa {args.kappa}, "
              f"{'after reading ' + str(args.evict_mb) + ' MB' if args.evict_mb else 'warm caches'})")
    print(f"same top-{args.kappa} ids (pytorch, graph): {same}; int8 graph's top-{args.kappa} shared with fp32's: "
          f"{overlap:.3f}")
    return {"ms": out, "same_ids": same, "int8_overlap": overlap}


if __name__ == "__main__":
    main()
