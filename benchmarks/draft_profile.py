"""Where a drafted token's time goes: ONNX Runtime's own profile of the gguf draft's built graph.

    python -m benchmarks.draft_profile [--model PATH] [--contexts 128 512] [--tokens 1 6] [--reps 40] [--out F]

The default draft network (`draft_quant=gguf` on the CPU provider: `mirror/onnx/gguf_net.py`)
is one graph of ~900 nodes. For each (cached positions, tokens per call) - 1 token is a serial
draft step or a branch rollout step, several are a window fed to the draft at once (another
drafter's window before Mirror-SD's pre-signal rollouts) - this times `--reps` calls on one thread
(`benchmarks.int8_draft.forward_times`),
twice: without profiling (the median is the figure to quote), then with ONNX Runtime's profiler on,
which attributes kernel time to op types (per call, means over the profiled calls; the profiler
adds its own per-node overhead, and time outside the kernels is not in them). The LM head (the
file's 8-bit embedding: the last MatMulNBits blocks.convert_graph makes) is reported on its own,
apart from the layers'. Random token ids, seed 0; run it on an idle core
(`taskset -c 1 python -m benchmarks.draft_profile`).
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import statistics
import tempfile

import torch
from tqdm import tqdm


def profile_ops(events: list, runs: list, head: str) -> dict:
    """Per op type: ms per call over the model runs `runs` (events of an ONNX Runtime profile);
    the node named `head` (the LM head's MatMulNBits) under "head", not its op type."""
    starts = [r["ts"] for r in runs]  # (sorted)
    ops = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1  # the run it falls in, if any
        if i >= 0 and e["ts"] <= runs[i]["ts"] + runs[i]["dur"]:
            op = e.get("args", {}).get("op_name", "?")
            ops["head" if e["name"] == head + "_kernel_time" else op] += e["dur"]
    return {op: us / len(runs) / 1e3 for op, us in ops.most_common()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled model)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 512], help="cached positions")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 6], help="tokens per call")
    ap.add_argument("--reps", type=int, default=40, help="timed calls per case (and profiled ones)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.reps < 1 or min(args.tokens) < 1 or min(args.contexts) < 0:
        ap.error("--reps and --tokens must be >= 1, --contexts >= 0")

    from mirror.models.loader import load_model
    from mirror.onnx import providers
    from mirror.onnx.gguf_net import GgufDraftNet

    from .int8_draft import forward_times

    torch.set_num_threads(1)
    model = load_model(args.model, tokenizer=False).model
    if max(args.contexts) + max(args.tokens) + 1 > model.cfg.max_seq_len:
        ap.error(f"--contexts + --tokens must stay below the model's {model.cfg.max_seq_len} positions")
    try:
        plain = GgufDraftNet(model)
    except ValueError as e:
        ap.error(str(e))
    tmp = tempfile.TemporaryDirectory(prefix="draft_profile_")
    make = providers.session_options

    def profiled(*a, **k):  # the same session, with ONNX Runtime's profiler on
        so = make(*a, **k)
        so.enable_profiling, so.profile_file_prefix = True, os.path.join(tmp.name, "prof")
        return so

    providers.session_options = profiled
    try:
        prof = GgufDraftNet(model)
    finally:
        providers.session_options = make
    cases = [(c, t) for c in args.contexts for t in args.tokens]
    high = min(20000, model.cfg.vocab_size)
    rows = []
    for c, t in tqdm(cases, desc="timed"):
        ms = [s * 1e3 for s in forward_times(plain, c, t, args.reps, high)]
        rows.append({"context": c, "tokens": t, "median_ms": statistics.median(ms), "times_ms": ms})
    for c, t in tqdm(cases, desc="profiled"):
        forward_times(prof, c, t, args.reps, high)
    with tmp, open(prof.sess.end_profiling()) as f:
        events = json.load(f)
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    at = 0
    for row in rows:  # each case's calls (forward_times): the context's prefill (if any), 3 warm-ups, the reps
        at += (row["context"] > 0) + 3
        # (blocks.convert_graph names each MatMulNBits by its order; the head is converted last)
        row["ops_ms"] = profile_ops(events, runs[at:at + args.reps], f"MatMul_gguf{prof.counts['converted']}")
        at += args.reps
    if at != len(runs):
        raise RuntimeError(f"the profile holds {len(runs)} runs, {at} were made")
    res = {"model": model.source_file, "threads": 1, "reps": args.reps, "rows": rows}
    cols = ("MatMulNBits", "head", "GroupQueryAttention", "MatMul")
    print("| cached | tokens | ms per call (median) | layers' MatMulNBits | LM head | GroupQueryAttention | "
          "MatMul (Q4_1 offsets) | all kernels (profiled) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        o = r["ops_ms"]
        print(f"| {r['context']} | {r['tokens']} | {r['median_ms']:.1f} | "
              + " | ".join(f"{o.get(k, 0.0):.2f}" for k in cols) + f" | {sum(o.values()):.2f} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
