"""Draft cost per drafted token next to one target step, with and without VocabTrim.

    python -m benchmarks.draft_cost [--adapter artifacts/draft/draft.safetensors]
        [--vocab-trim artifacts/draft/vocab_trim.json] [--draft-model artifacts/small4/model]
        [--gamma 5] [--threads 1]

Timed on one thread (a pinned core, as in the runtime): a target verification step over a
window of gamma+1 tokens, and a draft step (one token) of each network draft kind, at a context
of --context tokens. The n-gram draft's cost is a dict lookup (also timed). Ratios are draft
time per token / target step time; the Mirror-SD goal is <= 1/6.
"""
from __future__ import annotations

import argparse
import json
import os

import torch


def _time(fn, reps: int) -> float:
    from .exit_profile import _median_time

    return _median_time(fn, reps, warm=3)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--vocab-trim", default=None)
    ap.add_argument("--datastore", default=None)
    ap.add_argument("--draft-model", default=None, help="a separate draft model (`mirror distill-draft` folder)")
    ap.add_argument("--int8-calib", default=None, metavar="FILE",
                    help="also time the int8 copy of the target with these SmoothQuant statistics ('bundled')")
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--draft-layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default="runs/draft_cost.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mirror.decoding.drafters.ngram import NgramDrafter, load_datastore
    from mirror.decoding.factory import build_draft_net
    from mirror.models import load_model
    from mirror.sampling import SamplingParams
    from mirror.spec_config import SpecConfig

    lm = load_model()
    m = lm.model
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(100, 20000, (1, args.context), generator=g)
    G = args.gamma
    with torch.inference_mode():
        cache = m.new_cache(1, args.context + G + 2)
        m(ctx, torch.arange(args.context)[None], cache)
        win = torch.randint(100, 20000, (1, G + 1), generator=g)
        pos = torch.arange(args.context, args.context + G + 1)[None]
        t_target = _time(lambda: m(win, pos, cache, kv_len=args.context + G + 1), args.reps)
        one = win[:, :1]
        t_target1 = _time(lambda: m(one, pos[:, :1], cache, kv_len=args.context + 1), args.reps)
    out = {"threads": args.threads, "context": args.context, "gamma": G,
           "target_step_ms": t_target * 1e3, "target_single_token_ms": t_target1 * 1e3, "drafts": {}}
    configs = [("self k=%d full head" % args.draft_layers, dict(draft="self", draft_layers=args.draft_layers))]
    if args.vocab_trim:
        configs.append(("self k=%d VocabTrim" % args.draft_layers,
                        dict(draft="self", draft_layers=args.draft_layers, vocab_trim=args.vocab_trim)))
    if args.adapter:
        configs.append(("self+adapter (artifact)", dict(draft="self", adapter=args.adapter)))
        configs.append(("streaming (artifact)", dict(draft="streaming", adapter=args.adapter, streams=2)))
    if args.draft_model:
        configs.append(("separate model (%s)" % os.path.basename(os.path.normpath(args.draft_model)),
                        dict(draft="model", draft_model=args.draft_model)))
    if args.int8_calib:
        configs.append(("int8 copy of the target", dict(draft="model", draft_model="target", draft_quant="int8",
                                                        int8_calib=args.int8_calib)))
    for name, kw in configs:
        spec = SpecConfig(method="sd", **kw)
        kind = spec.draft
        net = build_draft_net(m, spec, kind)
        with torch.inference_mode():
            dc = net.new_cache(1, args.context + G + 4)
            net(ctx, torch.arange(args.context)[None], dc)
            t = _time(lambda: net(one, pos[:, :1], dc, kv_len=args.context + 1), args.reps)
        out["drafts"][name] = {"ms_per_token": t * 1e3, "ratio_to_target_step": t / t_target,
                               "vocab": net.vocab}
    nd = NgramDrafter(SamplingParams(), datastore=load_datastore(args.datastore) if args.datastore else None)
    nd.start(ctx[0].tolist())
    t = _time(lambda: nd.propose(G), args.reps)
    out["drafts"]["ngram" + (" + datastore" if args.datastore else "")] = {
        "ms_per_token": t * 1e3 / G, "ratio_to_target_step": t / G / t_target, "vocab": None}
    if args.vocab_trim:
        full = out["drafts"]["self k=%d full head" % args.draft_layers]["ms_per_token"]
        trim = out["drafts"]["self k=%d VocabTrim" % args.draft_layers]["ms_per_token"]
        out["vocab_trim_step_time_cut"] = 1 - trim / full
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"target step (window of {G + 1}): {t_target * 1e3:.1f} ms; single token {t_target1 * 1e3:.1f} ms")
    for name, d in out["drafts"].items():
        print(f"{name:32s} {d['ms_per_token']:7.2f} ms/token  = {d['ratio_to_target_step']:.3f} of a target step")
    if "vocab_trim_step_time_cut" in out:
        print(f"VocabTrim cuts the draft step time by {100 * out['vocab_trim_step_time_cut']:.0f}%")
    return out


if __name__ == "__main__":
    main()
