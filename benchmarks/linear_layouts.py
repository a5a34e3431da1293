"""Why a verify pass costs more than a plain step here: the bundled model's linear layers timed
at M = 1..8 rows (one decode token .. a verify window) in two weight layouts.

    python -m benchmarks.linear_layouts --threads 2

`linear` is what the model runs: F.linear(x, W) with W stored [out, in]. `x@Wt` multiplies by a
pre-transposed contiguous copy [in, out]. The shapes are SmolLM2-135M's (30 layers of q, k, v,
o, gate, up, down; the tied 49,152-row head), with distinct random weights per layer so nothing
stays in cache. Prints the median ms per pass over all layers and for the head, and GFLOP/s.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from .exit_profile import _median_time

LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def _time(fn, reps: int) -> float:
    return _median_time(fn, reps, warm=3) * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 6, 8])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--layers", type=int, default=30)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ws = [torch.randn(o, i) for _ in range(a.layers) for (o, i) in LAYER]
    wts = [w.t().contiguous() for w in ws]
    head = torch.randn(49152, 576)
    head_t = head.t().contiguous()
    flops_layers = 2 * sum(w.numel() for w in ws)
    print(f"threads {a.threads}; {a.layers} layers {sum(w.numel() for w in ws) / 1e6:.1f}M params, "
          f"head {head.numel() / 1e6:.1f}M params (fp32)")
    print("| rows | layers: linear ms | layers: x@Wt ms | head: linear ms | head: x@Wt ms | layers linear GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for m in a.rows:
        xs = [torch.randn(m, w.shape[1]) for w in ws]
        xh = torch.randn(m, 576)
        lin = _time(lambda: [F.linear(x, w) for x, w in zip(xs, ws)], a.reps)
        tr = _time(lambda: [x @ w for x, w in zip(xs, wts)], a.reps)
        hl = _time(lambda: F.linear(xh, head), a.reps)
        ht = _time(lambda: xh @ head_t, a.reps)
        print(f"| {m} | {lin:.1f} | {tr:.1f} | {hl:.1f} | {ht:.1f} | {m * flops_layers / lin / 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
