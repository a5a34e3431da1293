"""Why a verify pass costs more than a plain step here: the bundled model's linear layers timed
at M = 1..8 rows (one decode token .. a verify window) in four GEMM paths.

    python -m benchmarks.linear_layouts --threads 2

  model    what the model runs: `mirror.models.ops.Linear`, the weight pre-packed for oneDNN
           (one kernel for every M >= 2; a single row is padded to two: batch invariance)
  linear   F.linear(x, W), W stored [out, in] (PyTorch's BLAS: MKL on x86 builds)
  x@Wt     x @ Wt with a pre-transposed contiguous copy [in, out]
  ort      ONNX Runtime's CPU MatMul (MLAS) with the weights as initializers, all of a layer
           set's products in one graph and one session call (so no per-call overhead)

The shapes are SmolLM2-135M's (30 layers of fused q|k|v, o, fused gate|up, down; the tied
49,152-row head), with distinct random weights per layer so nothing stays in cache. Prints the
median ms per pass over all layers and for the head, and whether each path is row-invariant:
row i of an M-row product bit for bit the product of row i alone - what exact (lossless)
speculative verification needs from the target's GEMM.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from .exit_profile import _median_time

# fused shapes as the model holds them: wqkv [960, 576], wo, w13 [3072, 576], w2
LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
HEAD = (49152, 576)
PATHS = ("model", "linear", "x@Wt", "ort")


def _time(fn, reps: int) -> float:
    return _median_time(fn, reps, warm=3) * 1000


def _ort_session(weights: list[torch.Tensor], threads: int):
    """One session computing x_i @ W_i^T for every weight; inputs grouped by in-features."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs, ins = [], [], [], {}
    for j, w in enumerate(weights):
        name = f"x{w.shape[1]}"
        ins.setdefault(name, helper.make_tensor_value_info(name, TensorProto.FLOAT, ["m", w.shape[1]]))
        inits.append(numpy_helper.from_array(w.t().contiguous().numpy(), f"w{j}"))
        nodes.append(helper.make_node("MatMul", [name, f"w{j}"], [f"y{j}"]))
        outs.append(helper.make_tensor_value_info(f"y{j}", TensorProto.FLOAT, ["m", w.shape[0]]))
    graph = helper.make_graph(nodes, "linears", list(ins.values()), outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    from mirror.models.ort_target import join_global_pool

    join_global_pool(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def make_paths(weights: list[torch.Tensor], threads: int, with_ort: bool = True) -> dict:
    """path -> fn(xs: {in_features: [M, in] tensor}) -> list of outputs, one per weight."""
    from mirror.models.ops import Linear

    mods = []
    for w in weights:
        lin = Linear(w.shape[1], w.shape[0])
        lin.weight.data.copy_(w)
        lin.weight.requires_grad_(False)  # as Transformer.prepare() leaves it
        lin.pack()
        mods.append(lin)
    wts = [w.t().contiguous() for w in weights]
    paths = {
        "model": lambda xs: [m(xs[m.in_features]) for m in mods],
        "linear": lambda xs: [F.linear(xs[w.shape[1]], w) for w in weights],
        "x@Wt": lambda xs: [xs[w.shape[0]] @ w for w in wts],
    }
    if with_ort:
        sess = _ort_session(weights, threads)

        def ort_run(xs):
            feeds = {f"x{k}": v.numpy() for k, v in xs.items()}
            return [torch.from_numpy(y) for y in sess.run(None, feeds)]
        paths["ort"] = ort_run
    return paths


def row_invariant(fn, in_dims: list[int], m: int, seed: int = 1) -> bool:
    """Each row of an m-row call equal, bit for bit, to that row computed alone."""
    g = torch.Generator().manual_seed(seed)
    xs = {d: torch.randn(m, d, generator=g) for d in in_dims}
    full = fn(xs)
    for i in range(m):
        alone = fn({d: x[i:i + 1].clone() for d, x in xs.items()})
        if not all(torch.equal(a[0], f[i]) for a, f in zip(alone, full)):
            return False
    return True


@torch.inference_mode()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 6, 8])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime path")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ws = [torch.randn(o, i) * 0.05 for _ in range(a.layers) for (o, i) in LAYER]
    head = [torch.randn(*HEAD) * 0.05]
    layers = make_paths(ws, a.threads, not a.no_ort)
    heads = make_paths(head, a.threads, not a.no_ort)
    names = list(layers)
    dims = sorted({w.shape[1] for w in ws})
    print(f"threads {a.threads}; {a.layers} layers {sum(w.numel() for w in ws) / 1e6:.1f}M params, "
          f"head {head[0].numel() / 1e6:.1f}M params (fp32); ms per pass, median of {a.reps}")
    print("| rows | " + " | ".join(f"layers+head: {n}" for n in names) + " | " +
          " | ".join(f"head: {n}" for n in names) + " |")
    print("|---" * (1 + 2 * len(names)) + "|")
    for m in a.rows:
        xs = {d: torch.randn(m, d) for d in dims}
        xh = {HEAD[1]: torch.randn(m, HEAD[1])}
        tl = {n: _time(lambda: layers[n](xs), a.reps) for n in names}
        th = {n: _time(lambda: heads[n](xh), a.reps) for n in names}
        print(f"| {m} | " + " | ".join(f"{tl[n] + th[n]:.1f}" for n in names) + " | " +
              " | ".join(f"{th[n]:.1f}" for n in names) + " |", flush=True)
    m = max(a.rows)
    inv = {n: row_invariant(layers[n], dims, m) and row_invariant(heads[n], [HEAD[1]], m) for n in names}
    print(f"row-invariant at {m} rows (each row bit for bit as computed alone): " +
          ", ".join(f"{n} {'yes' if v else 'no'}" for n, v in inv.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
