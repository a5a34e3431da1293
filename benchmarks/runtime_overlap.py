"""Where a distributed Mirror-SD step's time goes: target stages, the channel, and how much of
the draft's work is hidden under the target suffix.

    python -m benchmarks.runtime_overlap [--config deploy/local.yaml] [--per-category 2]
        [--max-new-tokens 128] [--spec '{"draft": "ngram+self"}'] [--out runs/overlap.json]
    python -m benchmarks.runtime_overlap --from-bench runs/x/results.json   # a distributed bench run

Per request the target side records (seconds, summed over steps): prefix, signal send, suffix,
and the wait for the next window after sending the verdict; the draft side records branch
rollouts (expand), preparing them once a window is sent (prepare: a network draft writes the
window's KV while the target runs its prefix), the part of that work which ran past the
verdict's arrival (overrun: a rollout finishes its step first), and turning verdicts into
windows (a dict lookup on a hit, serial drafting on a miss). From these:
  hidden fraction  = (prepare + expand - overrun) / (prepare + expand + verdict): draft compute
                     done while the target was busy with its layers;
  channel time     = window wait - (overrun + verdict) + signal send: time on the wire and in
                     the gRPC stacks, not in either model;
  channel share    = channel time / decode time;
  taken rate       = share of verdicts whose window the target took from the branches the draft
                     pushed before the verdict (SpecConfig.push_branches): no round trip, and the
                     draft's verdict work on them is off the target's path, so with a high taken
                     rate `channel time` under-estimates (it subtracts that work from the wait);
  cut per step     = window tokens the target's suffix left unverified (SpecConfig.verify_cut);
                     cut wrong share: cuts where the target's token was the first unverified one.
The token-channel round trip itself is measured by benchmarks/channel_latency.py.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--questions", default=None)
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--spec", default=None, help="SpecConfig overrides as JSON")
    ap.add_argument("--out", default="runs/overlap.json")
    ap.add_argument("--from-bench", default=None, metavar="RESULTS_JSON",
                    help="summarise a `mirror bench --runtime distributed` results.json instead of running")
    ap.add_argument("--method", default=None, help="with --from-bench: the method label (default: every mirror one)")
    args = ap.parse_args(argv)
    if args.from_bench:
        return from_bench(args.from_bench, args.method, args.out)

    import dataclasses

    from tqdm import tqdm

    from mirror.models.loader import load_tokenizer
    from mirror.runtime.config import DeploymentConfig
    from mirror.sampling import SamplingParams

    from .bench import DistributedBenchEngine
    from .specbench import load_questions, select

    deploy = DeploymentConfig.load(args.config) if args.config else DeploymentConfig.local()
    spec = dataclasses.replace(deploy.speculative, method="mirror")
    if args.spec:  # {"method": "sd"}: the same requests with vanilla SD, for its step time
        spec = dataclasses.replace(spec, **json.loads(args.spec))
    tok, _ = load_tokenizer(deploy.model)

    class _LM:
        tokenizer = tok

    eng = DistributedBenchEngine(_LM, args.config)
    qs = select(load_questions(args.questions), args.per_category)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    t0 = time.time()
    ms = []
    try:
        for q in tqdm(qs, desc="requests"):
            ids = tok.encode_chat([{"role": "user", "content": q["turns"][0]}])
            ms.append(eng.generate(ids, params, spec).metrics.to_dict())
    finally:
        eng.close()
    out = {"config": args.config or "local (embedded)", "spec": spec.to_dict(), **summarise(ms),
           "elapsed_s": time.time() - t0}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))
    return out


def summarise(metrics: list[dict]) -> dict:
    """The overlap figures of distributed Mirror-SD requests (their `Metrics.to_dict()`)."""
    tot = {k: 0.0 for k in ("prefix_s", "suffix_s", "signal_s", "window_s", "first_window_s", "decode_s",
                            "expand_s", "overrun_s", "verdict_s", "prepare_s")}
    steps = hits = misses = tokens = pre_branches = pre_hits = taken = early = cut = cut_steps = cut_wrong = 0
    for m in metrics:
        cut += m.get("cut_tokens", 0)
        cut_steps += m.get("cut_steps", 0)
        cut_wrong += m.get("cut_wrong", 0)
        taken += m["extra"].get("taken", 0)
        early += m["extra"].get("early", 0)
        pre_branches += m["extra"].get("pre_branches", 0)
        pre_hits += m["extra"].get("pre_hits", 0)
        for k, v in m["extra"].get("timing", {}).items():
            tot[k] = tot.get(k, 0.0) + v
        for k, v in m["extra"].get("draft_timing", {}).items():
            tot[k] += v
        tot["decode_s"] += m["decode_s"]
        steps += m["target_steps"]
        hits += m["hits"]
        misses += m["misses"]
        tokens += m["new_tokens"]
    draft_total = tot["prepare_s"] + tot["expand_s"] + tot["verdict_s"]
    exposed = tot["overrun_s"] + tot["verdict_s"]
    channel = max(0.0, tot["window_s"] - exposed) + tot["signal_s"]
    n = len(metrics)
    return {
        "requests": n, "steps": steps, "tokens": tokens, "tau": (tokens - n) / steps if steps else 0.0,
        "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        # pushed branches (SpecConfig.push_branches): share of verdicts whose window the target
        # already held - no round trip; the draft's work on them is off the target's path too
        "taken_rate": taken / (hits + misses) if hits + misses else 0.0,
        # rollout_stop="reply": share of verdicts answered with a rollout's tokens so far (the draft
        # step still running then finishes after the window went out: its overrun is not exposed)
        "early_rate": early / (hits + misses) if hits + misses else 0.0,
        # pre-signal rollouts (pre_budget): share of verdicts whose window came from one
        "pre_hit_rate": pre_hits / (hits + misses) if hits + misses else 0.0,
        "pre_branches_per_step": pre_branches / max(steps, 1),
        # verify_cut: window tokens per step the suffix did not verify (early exit predicted a rejection)
        "cut_per_step": cut / max(steps, 1),
        "cut_step_share": cut_steps / max(steps, 1),
        "cut_wrong_share": cut_wrong / max(cut_steps, 1),  # of cut steps: the target would have taken the cut token
        "per_step_ms": {k: 1e3 * v / max(steps, 1) for k, v in tot.items()},
        "hidden_fraction": (tot["prepare_s"] + tot["expand_s"] - tot["overrun_s"]) / draft_total if draft_total else 0.0,
        "channel_share_of_step": channel / tot["decode_s"] if tot["decode_s"] else 0.0,
        "channel_ms_per_step": 1e3 * channel / max(steps, 1),
        "tokens_per_s": tokens / tot["decode_s"] if tot["decode_s"] else 0.0,
    }


def from_bench(path: str, method: str | None, out_path: str) -> dict:
    with open(path) as f:
        res = json.load(f)
    labels = [method] if method else [lb for lb in res["config"]["methods"] if lb.startswith("mirror")]
    out = {"source": path, "runtime": res["config"].get("runtime")}
    for lb in labels:
        ms = [t["metrics"] for q in res["questions"] for t in q["methods"][lb]["turns"]]
        out[lb] = summarise(ms)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
