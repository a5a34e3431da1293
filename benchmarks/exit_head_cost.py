"""The early-exit head's cost per Mirror-SD step: PyTorch (eager) against the onnx target's graph.

    python -m benchmarks.exit_head_cost [--threads 2] [--rows 6] [--kappa 8] [--reps 200]

The shipped exit head (`exit_head: bundled`, a rank-64 update) and exit trim (`exit_trim:
bundled`, 8192 token ids) on the bundled model, over `--rows` hidden states (a window of gamma +
1 = 6 positions by default): `EarlyExit`'s PyTorch path on one host thread (how the onnx target's
process runs host-side ops), and the same head as an ONNX Runtime graph on the target's
`--threads`-thread pool (`OrtTarget.exit_head`, what Mirror-SD runs on the onnx target). Median
milliseconds per call, and whether both give the same top-kappa ids.
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
    out = {}
    with host_threads(1), torch.inference_mode():
        eager, graph = EarlyExit(model, args.kappa, trained, keep), EarlyExit(target, args.kappa, trained, keep)
        for name, head in (("pytorch, 1 host thread", eager), (f"onnx graph, {args.threads} threads", graph)):
            out[name] = _median_time(lambda: head(h), args.reps, warm=5) * 1e3
        same = torch.equal(eager(h)[0], graph(h)[0])
    for name, ms in out.items():
        print(f"{name:28s} {ms:6.2f} ms per call ({args.rows} rows, trim {len(keep)}, kappa {args.kappa})")
    print(f"same top-{args.kappa} ids: {same}")
    return {"ms": out, "same_ids": same}


if __name__ == "__main__":
    main()
