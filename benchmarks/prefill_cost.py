"""A prompt's prefill on the target's CPU paths, against a bare GEMM on the same cores.

    python -m benchmarks.prefill_cost [--model PATH] [--lengths 750 1500] [--reps 5] [--out runs/prefill_cost.json]

On rag and summarization the ~750-token prompt's prefill is a quarter to a third of plain
decoding's time, and every method pays it alike, so it caps their speedups. This measures how
far from the machine's limit it runs. Each length (random token ids, seed 0) is prefilled into a
fresh cache the way the runtime does it (`mirror.decoding.ar.prefill`, chunks of 512) by:
- `onnx fused` / `onnx materialized`: the onnx target as the embedded default builds it on a
  2-core machine - decoding on one thread of the first core, `prefill_cores` both, so prompt
  chunks run on a two-thread session set - with `prefill_attention` fused (the default) or
  materialized;
- `onnx one core`: the onnx target without `prefill_cores` (the prompt on the decode thread);
- `eager`: the PyTorch model on both cores.
Rounds alternate the paths; per path and length: the median seconds, the rate of the layers'
linears (2 x their weights x tokens / time: a lower bound on the work done), and the last
position's logits against `onnx materialized` (max abs difference, and whether the argmax is the
same). The ceiling: one torch GEMM of the FFN's shape ([n, dim] x [dim, 2 ffn]) on both cores.
Needs two cores; run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from tqdm import tqdm

PATHS = ("onnx fused", "onnx materialized", "onnx one core", "eager")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file or HF folder (default: the bundled model)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[750, 1500], help="prompt lengths in tokens")
    ap.add_argument("--reps", type=int, default=5, help="alternating rounds")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        ap.error("needs two cores (this process may use one)")
    if args.reps < 1:
        ap.error("--reps must be >= 1")

    from mirror.decoding.ar import prefill
    from mirror.models.loader import load_model
    from mirror.models.ort_target import OrtTarget

    from .exit_profile import _median_time

    model = load_model(args.model, tokenizer=False).model
    cfg = model.cfg
    bad = [n for n in args.lengths if not 1 <= n <= cfg.max_seq_len]
    if bad:
        ap.error(f"--lengths {bad}: a prompt must have 1 to {cfg.max_seq_len} tokens for this model")
    # the onnx targets as a target worker builds them: pinned to the first core, one thread
    # (the prefill sessions must come before any shared ONNX Runtime pool in this process)
    os.sched_setaffinity(0, {cores[0]})
    torch.set_num_threads(1)
    targets = {f"onnx {a}": OrtTarget(model, threads=1, prefill_cores=cores, prefill_attention=a)
               for a in ("fused", "materialized")}
    targets["onnx one core"] = OrtTarget(model, threads=1)
    for name in ("onnx fused", "onnx materialized"):
        if not targets[name].wide_prefill:
            raise SystemExit(f"{name}: the prefill sessions were not built ({targets[name].pool})")
    linear = sum(p.numel() for p in model.layers.parameters() if p.dim() == 2)

    def run(path: str, ids: list[int]) -> tuple[float, torch.Tensor]:
        eager = path == "eager"
        os.sched_setaffinity(0, set(cores) if eager else {cores[0]})
        torch.set_num_threads(2 if eager else 1)
        cache = model.new_cache(1, len(ids))
        t0 = time.perf_counter()
        logits = prefill(model if eager else targets[path], cache, ids)
        return time.perf_counter() - t0, logits

    prompts = {n: torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
               for n in args.lengths}
    times = {(p, n): [] for p in PATHS for n in args.lengths}
    last = {}
    with tqdm(total=args.reps * len(PATHS) * len(args.lengths), desc="prefill", unit="run") as bar:
        for _ in range(args.reps):
            for n in args.lengths:
                for path in PATHS:
                    bar.set_postfix_str(f"{path}, {n} tokens")
                    dt, last[(path, n)] = run(path, prompts[n])
                    times[(path, n)].append(dt)
                    bar.update()
    os.sched_setaffinity(0, set(cores))
    torch.set_num_threads(2)
    rows = []
    for n in args.lengths:
        a, b = torch.randn(n, cfg.dim), torch.randn(cfg.dim, 2 * cfg.ffn_dim)
        gemm_rate = 2 * n * cfg.dim * 2 * cfg.ffn_dim / _median_time(lambda: a @ b, 10, warm=3) / 1e9
        ref = last[("onnx materialized", n)]
        for path in PATHS:
            s = statistics.median(times[(path, n)])
            lg = last[(path, n)]
            rows.append({"path": path, "tokens": n, "median_s": s, "times_s": times[(path, n)],
                         "linear_gflops": 2 * linear * n / s / 1e9, "gemm_gflops": gemm_rate,
                         "max_abs_diff": float((lg - ref).abs().max()),
                         "same_argmax": int(lg.argmax()) == int(ref.argmax())})
    print("| path | tokens | median s | linears GFLOP/s | share of a bare GEMM's rate | logits vs materialized |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['tokens']} | {r['median_s']:.3f} | {r['linear_gflops']:.1f} | "
              f"{r['linear_gflops'] / r['gemm_gflops']:.0%} (GEMM {r['gemm_gflops']:.0f}) | "
              f"{r['max_abs_diff']:.1e}{'' if r['same_argmax'] else ', ARGMAX DIFFERS'} |")
    out = {"model": args.model or "bundled", "cores": cores, "linear_params": linear, "reps": args.reps,
           "rows": rows}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
