"""Draft cost per drafted token next to one target step, with and without VocabTrim.

    python -m benchmarks.draft_cost [--adapter artifacts/draft/draft.safetensors]
        [--vocab-trim artifacts/draft/vocab_trim.json] [--draft-model artifacts/small4/model]
        [--gamma 5] [--threads 1]

Timed on one thread (a pinned core, as in the runtime): a target verification step over a
window of gamma+1 tokens, and a draft step (one token) of each network draft kind, at a context
of --context tokens. The n-gram draft's cost is a dict lookup (also timed). Ratios are draft
time per token / target step time; the Mirror-SD goal is <= 1/6.

    python -m benchmarks.draft_cost --from-bench runs/X/results.json

The same ratio as it happened in an in-process `mirror bench` run, per `sd` method: all the time
the target waited for windows (the draft's work, serial in one process) over the tokens drafted,
against the mean verification step of the same run. For a combined draft (ngram+model) this is
the mix it chose per step; `windows_by_source` says how many windows each part drafted.
"""
from __future__ import annotations

import argparse
import json
import os

import torch


def _time(fn, reps: int) -> float:
    from .exit_profile import _median_time

    return _median_time(fn, reps, warm=3)


def from_bench(path: str) -> dict:
    """Per in-process sd method of a `mirror bench` results.json: draft ms per drafted token, target
    ms per verification step, their ratio, tau and the windows each draft source made."""
    with open(path) as f:
        res = json.load(f)
    if res["config"].get("runtime") != "inprocess":
        raise SystemExit(f"{path}: --from-bench reads in-process runs (draft time is serial there); "
                         f"this one is {res['config'].get('runtime')!r}")
    acc: dict[str, dict] = {}
    for q in res["questions"]:
        for label, mres in q["methods"].items():
            if not label.startswith("sd"):
                continue
            a = acc.setdefault(label, {"draft_s": 0.0, "verify_s": 0.0, "drafted": 0, "steps": 0,
                                       "accepted": 0, "windows_by_source": {}})
            for turn in mres["turns"]:
                m = turn["metrics"]
                t = m["extra"]["timing"]
                a["draft_s"] += t["window_s"] + t["first_window_s"]
                a["verify_s"] += t["verify_s"]
                a["drafted"] += m["drafted_tokens"]
                a["steps"] += m["target_steps"]
                a["accepted"] += m["accepted_tokens"]
                for k, v in (m["extra"].get("windows_by_source") or {}).items():
                    a["windows_by_source"][k] = a["windows_by_source"].get(k, 0) + v
    out = {}
    for label, a in acc.items():
        d_ms = 1e3 * a["draft_s"] / max(a["drafted"], 1)
        t_ms = 1e3 * a["verify_s"] / max(a["steps"], 1)
        out[label] = {"draft_ms_per_token": d_ms, "target_step_ms": t_ms, "ratio_to_target_step": d_ms / t_ms,
                      "drafted_tokens": a["drafted"], "target_steps": a["steps"],
                      "tau": 1 + a["accepted"] / max(a["steps"], 1), "windows_by_source": a["windows_by_source"]}
        print(f"{label}\n    {d_ms:6.2f} ms per drafted token = {d_ms / t_ms:.3f} of a {t_ms:.1f}-ms target step; "
              f"tau {out[label]['tau']:.2f}; windows {a['windows_by_source'] or '-'}")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-bench", default=None, metavar="RESULTS_JSON",
                    help="report the cost as measured in an in-process `mirror bench` run instead of timing")
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
    if args.from_bench:
        return from_bench(args.from_bench)
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
