"""ONNX Runtime draft vs the PyTorch eager draft: per-call step times and end-to-end Mirror-SD.

    python -m benchmarks.onnx_draft [--draft-layers 4] [--vocab-trim FILE] [--onnx-dir DIR]
                                    [--max-len 1024] [--rows 8] [--context 256] [--tokens 64]

Both backends run the same draft (self-draft: the target's first k layers + its head) on one
thread (torch.set_num_threads(1); ORT intra/inter-op threads 1, CPU provider unless
--provider is given). Per call, at `--context` cached positions:
  step_t1     one token (serial drafting)
  step_tT     a T-token chunk (prefill / catch-up), T = --step-width
  branch_rR   R hypothesis rows x 1 token over the shared prefix (Mirror-SD rollouts)
PyTorch attends to the live context only; the ONNX graphs always attend to all max_len
positions (static shapes), so --max-len matters for them. End to end: greedy `mirror` with each
backend and plain decoding on --prompts prompts (Spec-Bench's first mt_bench questions when the
file is there), tok/s = new tokens / decode time; outputs must be identical.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

PROMPTS = [
    "Explain how a refrigerator works.",
    "Write a short poem about autumn leaves.",
    "What are the main causes of the French Revolution?",
]


def _median_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


@torch.inference_mode()
def step_times(tnet, onet, context: int, width: int, rows: int, reps: int) -> dict:
    """Median ms per call for both backends at `context` cached positions."""
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 1000, (1, context + width), generator=g)
    out = {}
    for name, net in (("torch", tnet), ("onnx", onet)):
        cache = net.new_cache(1, onet.max_len)
        net(toks[:, :context], torch.arange(context)[None], cache, kv_len=context, last_only=True)
        one = toks[:, context:context + 1]
        pos1 = torch.tensor([[context]])
        chunk = toks[:, context:context + width]
        posw = torch.arange(context, context + width)[None]
        buf = net.new_branch_buffer(cache, rows, 8)
        prefix = torch.full((rows,), context) - torch.arange(rows) % 4  # hypotheses at depths j = 0..3
        btok = toks[0, :rows, None].contiguous()
        r = {
            "step_t1": _median_ms(lambda: net(one, pos1, cache, kv_len=context + 1), reps),
            f"step_t{width}": _median_ms(lambda: net(chunk, posw, cache, kv_len=context + width, last_only=True),
                                         max(3, reps // 4)),
            f"branch_r{rows}": _median_ms(lambda: net.forward_branch(btok, prefix[:, None], cache, 0, prefix, buf,
                                                                     int(prefix.max())), reps),
        }
        out[name] = r
    return out


def end_to_end(lm, prompts: list[list[int]], spec_kw: dict, onnx_dir: str, providers, tokens: int) -> dict:
    from mirror.decoding.factory import generate
    from mirror.sampling import SamplingParams
    from mirror.spec_config import SpecConfig

    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    specs = {"ar": None, "mirror_torch": SpecConfig(**spec_kw),
             "mirror_onnx": SpecConfig(draft_backend="onnx", onnx_dir=onnx_dir, onnx_providers=providers, **spec_kw)}
    generate(lm.model, lm.tokenizer, prompts[0], SamplingParams(max_new_tokens=4, ignore_eos=True),
             specs["mirror_onnx"])  # load the sessions outside the timing
    res = {k: {"tok_s": [], "tau": [], "hit_rate": []} for k in specs}
    refs = []
    for p in prompts:
        for name, spec in specs.items():
            r = generate(lm.model, lm.tokenizer, p, params, spec)
            if name == "ar":
                refs.append(r.ids)
            elif r.ids != refs[-1]:
                raise AssertionError(f"{name} output differs from plain decoding")
            m = r.metrics
            res[name]["tok_s"].append(m.tokens_per_s)
            res[name]["tau"].append(m.tau)
            res[name]["hit_rate"].append(m.hit_rate)
    return {k: {f: sum(v) / len(v) for f, v in d.items()} | {"per_prompt_tok_s": d["tok_s"]}
            for k, d in res.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--draft-layers", type=int, default=4)
    ap.add_argument("--vocab-trim", default=None)
    ap.add_argument("--onnx-dir", default=None, help="an existing export (default: export into a temp folder)")
    ap.add_argument("--provider", action="append", default=None, help="execution provider (repeatable)")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--step-width", type=int, default=16)
    ap.add_argument("--context", type=int, default=256, help="cached positions for the per-call timings")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from benchmarks.specbench import default_questions_path, load_questions, select
    from mirror.decoding.drafters.network import DraftNet
    from mirror.decoding.drafters.vocab_trim import VocabTrim
    from mirror.models import load_model
    from mirror.onnx.export import export_draft
    from mirror.onnx.runtime import OrtDraftNet

    lm = load_model(args.model)
    keep = VocabTrim.load(args.vocab_trim).keep_ids if args.vocab_trim else None
    tnet = DraftNet.self_draft(lm.model, args.draft_layers, keep_ids=keep)
    onnx_dir = args.onnx_dir
    if onnx_dir is None:
        onnx_dir = tempfile.mkdtemp(prefix="mirror-onnx-bench-")
        t = time.perf_counter()
        export_draft(tnet, onnx_dir, target_cfg=lm.model.cfg, rows=args.rows, step_width=args.step_width,
                     max_len=args.max_len, source={"layers": args.draft_layers})
        print(f"exported to {onnx_dir} in {time.perf_counter() - t:.1f} s")
    onet = OrtDraftNet(onnx_dir, args.provider, target_cfg=lm.model.cfg)
    out = {"draft_layers": args.draft_layers, "vocab": onet.vocab, "max_len": onet.max_len,
           "context": args.context, "rows": onet.R, "provider": onet.status["provider"],
           "calls_ms": step_times(tnet, onet, args.context, args.step_width, onet.R, args.reps)}
    print(f"self-draft k={args.draft_layers}, vocab {onet.vocab}, ORT on {onet.status['provider']}, 1 thread, "
          f"context {args.context}, ORT max_len {onet.max_len}")
    for call in out["calls_ms"]["torch"]:
        a, b = out["calls_ms"]["torch"][call], out["calls_ms"]["onnx"][call]
        print(f"  {call:>10}: torch {a:7.2f} ms   onnx {b:7.2f} ms   ({a / b:.2f}x)")

    qpath = default_questions_path()
    if qpath:
        texts = [q["turns"][0] for q in select(load_questions(qpath), args.prompts)][:args.prompts]
    else:
        texts = PROMPTS[:args.prompts]
    prompts = [lm.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]
    spec_kw = dict(method="mirror", draft="self", draft_layers=args.draft_layers, vocab_trim=args.vocab_trim,
                   gamma=args.gamma, kappa=8, budget=args.rows, branch_batch=args.rows)
    out["end_to_end"] = end_to_end(lm, prompts, spec_kw, onnx_dir, args.provider, args.tokens)
    print(f"greedy, {len(prompts)} prompts x {args.tokens} new tokens, outputs identical to plain decoding:")
    for name, r in out["end_to_end"].items():
        extra = f"   tau {r['tau']:.2f}, hit rate {r['hit_rate']:.2f}" if name != "ar" else ""
        print(f"  {name:>12}: {r['tok_s']:6.2f} tok/s{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
