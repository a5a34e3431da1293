"""The GGUF file's own 4-bit blocks as the draft (draft_quant=gguf, mirror/onnx/blocks.py):
agreement, tau and cost, beside the int8 ONNX draft and the fp32 copy when given.

On the target's greedy answers to held-out *training* prompts (never Spec-Bench): top-1
agreement with the fp32 target (teacher-forced) and the exact tau of greedy vanilla SD at gamma
(replayed from those predictions), then one drafted token's time at several cached lengths
(one thread) against a target step verifying a window of gamma + 1 (the eager and the onnx
target backends, one thread). Measured twice: the static-shape export (what an NPU provider
runs) and the graph the CPU provider builds on first use (mirror/onnx/gguf_net.py).

    python -m benchmarks.gguf_draft --out runs/gguf_draft        # ~3 min on 2 cores (export on first use)

`--uncentred` adds the built graph with Q4_1 blocks at zero point 0 (the layout before blocks.py
centred them on 8): the same weights, more int8 rounding error.

`--export DIR` adds other exported drafts (e.g. `mirror export-draft --draft model --draft-model
target --draft-quant int8 --int8-calib bundled --max-len 1024 --out DIR`) to the same table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.feature_draft import corpus, replay_context_draft
from benchmarks.int8_draft import forward_ms, predictions


def main(argv=None) -> dict:
    from mirror.models import load_model
    from mirror.onnx.export import cached_export, read_metadata
    from mirror.onnx.runtime import OrtDraftNet
    from mirror.spec_config import SpecConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "train_prompts.jsonl"),
                    help="training prompts JSONL (default ../shared/data/train_prompts.jsonl; never Spec-Bench)")
    ap.add_argument("--out", default="runs/gguf_draft")
    ap.add_argument("--export", nargs="*", default=[], help="other exported drafts to measure beside it")
    ap.add_argument("--max-len", type=int, default=1024, help="cache positions of the gguf export")
    ap.add_argument("--holdout", type=int, default=20, help="held-out training prompts, from --holdout-skip on")
    ap.add_argument("--holdout-skip", type=int, default=4000)
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 900], help="cached positions for the timing")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--uncentred", action="store_true",
                    help="also the built graph with Q4_1 at zero point 0 (the layout before centring)")
    args = ap.parse_args(argv)
    for name in ("holdout", "gamma", "reps", "max_len"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if not Path(args.data).is_file():
        ap.error(f"training prompts not found: {args.data} (pass --data)")
    if max(args.contexts) + 1 >= args.max_len:
        ap.error(f"--contexts must stay below --max-len {args.max_len}")
    for d in args.export:
        if not (Path(d) / "draft.json").is_file():
            ap.error(f"--export {d}: no exported draft there (mirror export-draft ... --out {d})")
    torch.set_num_threads(2)
    lm = load_model(None)
    t = lm.model
    out = Path(args.out)
    hold = corpus(t, lm.tokenizer, args.data, args.holdout, args.holdout_skip,
                  out / f"hold{args.holdout_skip}_{args.holdout}.pt")
    spec = SpecConfig(method="sd", draft="model", draft_model="target", draft_quant="gguf", draft_backend="onnx",
                      onnx_max_len=args.max_len, branch_batch=4)
    dirs = [cached_export(t, spec, "model")] + list(args.export)
    res = {"holdout": args.holdout, "holdout_skip": args.holdout_skip, "gamma": args.gamma,
           "answer_tokens": sum(len(r["ids"]) - r["n_prompt"] for r in hold), "drafts": {}}
    G = args.gamma

    def measure(name: str, net, max_len: int, **extra) -> None:
        torch.set_num_threads(2)
        preds, agree = predictions(net, hold)
        tau = replay_context_draft(preds, hold, G)
        torch.set_num_threads(1)
        ms = {c: forward_ms(net, c, 1, args.reps) for c in args.contexts if c + 2 < max_len}
        res["drafts"][name] = {**extra, "top1_agreement": agree, "tau": tau, "ms_per_token": ms}
        print(f"{name:62s} agreement {agree:.3f}  tau {tau:.2f}  ms/token "
              + " ".join(f"{v:.1f}@{c}" for c, v in ms.items()), flush=True)

    # the CPU provider's gguf draft: the same blocks in one built dynamic-shape graph (gguf_net.py)
    from mirror.onnx.gguf_net import GgufDraftNet

    torch.set_num_threads(1)
    built = GgufDraftNet(t)
    measure("gguf blocks, built graph (GroupQueryAttention, dynamic shapes)", built, 1 << 30, mode="gguf-built",
            build_s=built.build_s)
    if args.uncentred:  # Q4_1 with zero point 0 (blocks.py before layout 2): the same weights
        del built
        built = GgufDraftNet(t, centre=False)
        measure("gguf blocks, built graph, Q4_1 uncentred (zero point 0)", built, 1 << 30,
                mode="gguf-built-uncentred", build_s=built.build_s)
    del built
    for d in dirs:
        meta = read_metadata(d)
        mode = (meta.get("quant") or {}).get("mode", "fp32")
        name = {"gguf": "gguf blocks (Q4_1 layers, Q8_0 head), MatMulNBits", "int8": "int8 (SmoothQuant, MatMulInteger)",
                }.get(mode, mode) + f", max_len {meta['shapes']['max_len']}"
        measure(name, OrtDraftNet(d, target_cfg=t.cfg), meta["shapes"]["max_len"], dir=d, mode=mode,
                weights_mb=meta["weights"]["bytes"] / 1e6)
    torch.set_num_threads(1)
    c = sorted(args.contexts)[len(args.contexts) // 2]
    res["target_step_ms"] = {"torch": forward_ms(t, c, G + 1, args.reps // 3 or 1), "context": c}
    try:
        from mirror.models.ort_target import OrtTarget, available

        if available():
            res["target_step_ms"]["onnx"] = forward_ms(OrtTarget(t, threads=1), c, G + 1, args.reps // 3 or 1)
    except ImportError:
        pass
    for name, r in res["drafts"].items():
        r["ratio_to_target_step"] = {b: r["ms_per_token"].get(c, float("nan")) / v
                                     for b, v in res["target_step_ms"].items() if b != "context"}
    print(f"target step (window of {G + 1}, {c} cached, 1 thread): "
          + ", ".join(f"{b} {v:.1f} ms" for b, v in res["target_step_ms"].items() if b != "context"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(res["drafts"])
        labels = [n.split(" (")[0].replace(", built graph", " built") for n in names]
        fig, ax = plt.subplots(1, 3, figsize=(12, 3.6))
        ax[0].bar(labels, [res["drafts"][n]["top1_agreement"] for n in names], color="tab:blue")
        ax[0].set_title("top-1 agreement with the fp32 target")
        ax[1].bar(labels, [res["drafts"][n]["tau"] for n in names], color="tab:green")
        ax[1].set_title(f"tau, greedy vanilla SD, gamma {G}")
        ax[2].bar(labels, [res["drafts"][n]["ms_per_token"].get(c, 0) for n in names], color="tab:orange")
        ax[2].set_title(f"ms per drafted token ({c} cached, 1 thread)")
        for a in ax:
            a.tick_params(axis="x", rotation=20, labelsize=8)
        fig.tight_layout()
        fig.savefig(out / "gguf_draft.png", dpi=120)
    except ImportError:
        pass
    print(f"wrote {out / 'results.json'}")
    return res


if __name__ == "__main__":
    main()
