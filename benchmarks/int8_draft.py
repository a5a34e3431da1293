"""The int8 copy of the target as a draft (mirror/models/quant.py): agreement, tau and cost.

On the target's greedy answers to held-out *training* prompts (never Spec-Bench), for plain
per-channel int8 and for SmoothQuant-smoothed int8 at several migration strengths alpha (the
activation statistics of `--calib`, a `mirror calibrate-int8` file; 'bundled' by default):
top-1 agreement with the target (teacher-forced) and the exact tau of greedy vanilla SD at
gamma (replayed from those predictions: the int8 copy is a context-only draft), plus one draft
step's time against a target step (window of gamma + 1) at one thread.

    python -m benchmarks.int8_draft --out runs/int8_draft        # ~6 min on 2 cores

With `--onnx DIR` (an export of the int8 draft: `mirror export-draft --draft model --draft-model
target --draft-quant int8 --int8-calib bundled --max-len 1024 --out DIR`), the same figures for
the ONNX Runtime int8 graphs (CPU execution provider, one thread), beside the PyTorch ones.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.feature_draft import corpus, replay_context_draft


def predictions(net, data: list[dict]) -> tuple[list[list[int]], float]:
    """Teacher-forced top-1 of a DraftNet (or OrtDraftNet) over each answer."""
    preds, hit, total = [], 0, 0
    with torch.inference_mode():
        for r in tqdm(data, desc="teacher-forced", unit="answer", leave=False):
            ids, a = r["ids"], r["n_prompt"]
            logits = net(ids[None], torch.arange(len(ids))[None], net.new_cache(1, len(ids)))[0]
            p = net.to_full(logits[a - 1:len(ids) - 1].argmax(-1))  # p[j] predicts answer token j
            preds.append(p[1:].tolist())  # replay_context_draft: p[j] is answer token j + 1
            hit += int((p == ids[a:]).sum())
            total += len(ids) - a
    return preds, hit / max(total, 1)


def forward_times(net, context: int, tokens: int, reps: int, high: int = 20000) -> list[float]:
    """Seconds of each of `reps` forwards of `tokens` new tokens after `context` cached ones
    (a Transformer or a DraftNet: both take tokens, positions, cache, kv_len), after the
    context's prefill (one call, when context > 0) and 3 warm-up forwards. Random ids in
    [100, high), seed 0."""
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(100, high, (1, max(context, tokens)), generator=g)
    times = []
    with torch.inference_mode():
        cache = net.new_cache(1, context + tokens + 1)
        if context:
            net(ctx[:, :context], torch.arange(context)[None], cache)
        x, pos = ctx[:, :tokens], torch.arange(context, context + tokens)[None]
        for _ in range(3):
            net(x, pos, cache, kv_len=context + tokens)
        for _ in range(reps):
            t = time.perf_counter()
            net(x, pos, cache, kv_len=context + tokens)
            times.append(time.perf_counter() - t)
    return times


def forward_ms(net, context: int, tokens: int, reps: int) -> float:
    """Mean milliseconds of one forward (see forward_times)."""
    return sum(forward_times(net, context, tokens, reps)) / reps * 1e3


def main(argv=None) -> dict:
    from mirror.models import load_model
    from mirror.models.bundled import resolve_artifact
    from mirror.models.quant import load_calibration, quantized_copy, smoothed_copy

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "train_prompts.jsonl"),
                    help="training prompts JSONL (default ../shared/data/train_prompts.jsonl; never Spec-Bench)")
    ap.add_argument("--out", default="runs/int8_draft")
    ap.add_argument("--calib", default="bundled", help="a `mirror calibrate-int8` file ('bundled': shipped)")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.7, 0.85, 1.0])
    ap.add_argument("--holdout", type=int, default=60, help="held-out training prompts, from --holdout-skip on")
    ap.add_argument("--holdout-skip", type=int, default=4000)
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--context", type=int, default=512, help="cached positions for the timing")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the agreement pass (timing: 1)")
    ap.add_argument("--onnx", default=None, help="also measure this exported int8 draft under ONNX Runtime")
    ap.add_argument("--vocab-trim", default=None,
                    help="also measure the bundled-alpha int8 draft with this VocabTrim head ('bundled': shipped)")
    args = ap.parse_args(argv)
    for name in ("holdout", "gamma", "context", "reps", "threads"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name} must be positive")
    if not Path(args.data).is_file():
        ap.error(f"training prompts not found: {args.data} (pass --data)")
    if any(not 0 < a <= 1 for a in args.alphas):
        ap.error("--alphas must be in (0, 1]")
    if args.onnx is not None and not (Path(args.onnx) / "draft.json").is_file():
        ap.error(f"--onnx {args.onnx}: no exported draft there (mirror export-draft ... --draft-quant int8)")
    torch.set_num_threads(args.threads)
    lm = load_model(None)
    t = lm.model
    out = Path(args.out)
    hold = corpus(t, lm.tokenizer, args.data, args.holdout, args.holdout_skip,
                  out / f"hold{args.holdout_skip}_{args.holdout}.pt")
    act, meta = load_calibration(resolve_artifact(args.calib, "int8_calib"))
    variants = {"int8, plain (per-channel weights, per-token activations)": quantized_copy(t)}
    for a in args.alphas:
        variants[f"int8, SmoothQuant alpha={a:g}"] = smoothed_copy(t, act, alpha=a)
    res = {"holdout": args.holdout, "holdout_skip": args.holdout_skip, "gamma": args.gamma,
           "calib": args.calib, "calib_meta": meta, "answer_tokens": sum(len(r["ids"]) - r["n_prompt"] for r in hold),
           "variants": {}}
    from mirror.decoding.drafters.network import DraftNet

    nets = {name: DraftNet.from_model(m) for name, m in variants.items()}
    trim_name = trim_base = None
    if args.vocab_trim:
        from mirror.decoding.drafters.vocab_trim import VocabTrim
        from mirror.models.quant import DEFAULT_ALPHA

        vt = VocabTrim.load(resolve_artifact(args.vocab_trim, "vocab_trim"))
        alpha = float(meta.get("alpha", DEFAULT_ALPHA))
        trim_base = f"int8, SmoothQuant alpha={alpha:g}"
        if trim_base not in variants:
            variants[trim_base] = smoothed_copy(t, act, alpha=alpha)
            nets[trim_base] = DraftNet.from_model(variants[trim_base])
        trim_name = f"{trim_base}, VocabTrim {len(vt)}"
        nets[trim_name] = DraftNet.from_model(variants[trim_base], vt.keep_ids)
    if args.onnx is not None:
        from mirror.onnx.runtime import OrtDraftNet

        nets["int8, ONNX Runtime (CPU EP)"] = OrtDraftNet(args.onnx, target_cfg=t.cfg)
    for name, net in nets.items():
        preds, agree = predictions(net, hold)
        res["variants"][name] = {"top1_agreement": agree, "tau": replay_context_draft(preds, hold, args.gamma)}
        print(f"{name:58s} agreement {agree:.3f}  tau {res['variants'][name]['tau']:.2f}", flush=True)
    torch.set_num_threads(1)
    G = args.gamma
    res["target_step_ms"] = forward_ms(t, args.context, G + 1, args.reps)
    best = max(variants, key=lambda k: res["variants"][k]["top1_agreement"])
    ms = forward_ms(nets[best], args.context, 1, args.reps)
    res["draft_ms_per_token"] = ms
    res["draft_ratio_to_target_step"] = ms / res["target_step_ms"]
    print(f"target step (window of {G + 1}, 1 thread): {res['target_step_ms']:.1f} ms; int8 draft token: {ms:.1f} ms "
          f"= {res['draft_ratio_to_target_step']:.3f} of a target step")
    if trim_name is not None:  # side by side, alternating, so load drift hits both alike
        full, trim = [], []
        for _ in range(3):
            full.append(forward_ms(nets[trim_base], args.context, 1, args.reps))
            trim.append(forward_ms(nets[trim_name], args.context, 1, args.reps))
        f, tr = sorted(full)[1], sorted(trim)[1]
        res["vocab_trim"] = {"file": args.vocab_trim, "size": len(vt), "full_ms": f, "trim_ms": tr,
                             "step_cut": 1 - tr / f, "trim_ratio_to_target_step": tr / res["target_step_ms"],
                             "tau_loss": 1 - res["variants"][trim_name]["tau"] / res["variants"][trim_base]["tau"]}
        print(f"VocabTrim ({len(vt)} tokens) on the int8 head: draft token {f:.1f} -> {tr:.1f} ms "
              f"({100 * res['vocab_trim']['step_cut']:.1f}% less; {res['vocab_trim']['trim_ratio_to_target_step']:.3f} "
              f"of a target step), tau {res['variants'][trim_base]['tau']:.2f} -> {res['variants'][trim_name]['tau']:.2f}")
    if args.onnx is not None:
        ms = forward_ms(nets["int8, ONNX Runtime (CPU EP)"], args.context, 1, args.reps)
        res["onnx_draft_ms_per_token"] = ms
        print(f"ONNX Runtime int8 draft token: {ms:.1f} ms = {ms / res['target_step_ms']:.3f} of a target step")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(res["variants"])
        labels = [n.replace("int8, ", "").replace(" (per-channel weights, per-token activations)", "") for n in names]
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        ax[0].bar(labels, [res["variants"][n]["top1_agreement"] for n in names], color="tab:blue")
        ax[0].set_title("top-1 agreement with the fp32 target")
        ax[1].bar(labels, [res["variants"][n]["tau"] for n in names], color="tab:green")
        ax[1].axhline(2.5, color="gray", ls="--", lw=1)
        ax[1].set_title(f"tau, greedy vanilla SD, gamma {G}")
        for a in ax:
            a.tick_params(axis="x", rotation=30, labelsize=8)
        fig.tight_layout()
        fig.savefig(out / "int8_draft.png", dpi=120)
    except ImportError:
        pass
    print(f"wrote {out / 'results.json'}")
    return res


if __name__ == "__main__":
    main()
