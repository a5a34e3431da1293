"""Offline tau of greedy drafts, replayed on the target's own greedy answers.

Greedy speculative decoding emits exactly the target's greedy text, so for a draft that does not
depend on the target's numbers (n-gram lookup over the context and a datastore) the accepted
length of every step follows from the answer alone: replay the answer, draft gamma tokens from
the committed context, accept the longest matching prefix, add the correction/bonus token. This
gives vanilla SD's tau without running the target - the quick loop for designing the n-gram draft
and sizing its datastore. A greedy network draft (`--draft-model`, e.g. from `mirror
distill-draft`) is replayed from one teacher-forced pass of the draft over each answer: it only
ever drafts after prefixes of the answer (a window counts up to its first mismatch), so its
predictions there fix every step (tests/test_distill.py checks the step counts against real runs).

Use it on answers to *held-out training prompts* (`mirror build-datastore --skip ...`), never on
Spec-Bench: tuning there would make the benchmark dishonest.

    python -m benchmarks.draft_sim --answers runs/ds_holdout --datastore bundled runs/ds3000/datastore.json
    python -m benchmarks.draft_sim --answers runs/ds_holdout --draft-model artifacts/small4/model
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from mirror.decoding.drafters.ngram import NgramDrafter, NgramModel, load_datastore
from mirror.decoding.drafters.window_stop import load_window_stop
from mirror.decoding.messages import DraftWindow, Verdict
from mirror.sampling import SamplingParams
from mirror.training.replay import load_answers, replay  # noqa: F401  (re-exported for tests)


class ReplayNet:
    """A network draft in the replay, from one teacher-forced pass over the answer: its greedy
    prediction at every answer position. In greedy SD the draft only runs on contexts that are
    prefixes of the answer (a window is accepted up to its first mismatch, and the rest does not
    matter), so these predictions give each step's accepted length exactly, up to floating-point
    near-ties between a one-pass forward and step-by-step drafting."""

    name = "model"

    def __init__(self, preds: list[int], prompt_len: int):
        self.preds, self.prompt_len = preds, prompt_len
        self.window = DraftWindow([])

    def start(self, ctx: list[int]) -> None:
        self.n = len(ctx) - self.prompt_len  # answer tokens committed

    def propose(self, gamma: int) -> DraftWindow:
        self.window = DraftWindow(self.preds[self.n:self.n + gamma], source="model")
        return self.window

    def observe(self, window: DraftWindow) -> None:
        """Another drafter's window is verified (CombinedDrafter): nothing to undo here."""
        self.window = window

    def commit(self, verdict: Verdict) -> None:
        self.n += verdict.accepted + 1


def network_predictions(draft_model: str, pairs) -> tuple[list[list[int]], float]:
    """Teacher-forced greedy predictions of a draft model (`mirror distill-draft` folder) for
    every answer token, and its top-1 agreement with the target over the answers."""
    import torch

    from mirror.decoding.drafters.network import DraftNet
    from mirror.decoding.drafters.vocab_trim import VocabTrim
    from mirror.decoding.factory import distilled_trim
    from mirror.models.loader import load_model

    model = load_model(draft_model, tokenizer=False).model
    trim = distilled_trim(draft_model)
    net = DraftNet.from_model(model, VocabTrim.load(trim).keep_ids if trim else None)
    preds, agree, total = [], 0, 0
    with torch.inference_mode():
        for prompt, answer in tqdm(pairs, desc="draft model, teacher-forced", unit="answer"):
            ids = prompt + answer
            cache = net.new_cache(1, len(ids))
            logits = net(torch.tensor([ids]), torch.arange(len(ids))[None], cache)[0]
            p = net.to_full(logits[len(prompt) - 1:len(ids) - 1].argmax(-1)).tolist()  # p[j] predicts answer[j]
            preds.append(p)
            agree += sum(a == b for a, b in zip(p[1:], answer[1:]))
            total += len(answer) - 1
    return preds, agree / max(total, 1)


def simulate(pairs, make_drafter, gamma: int, step_cost=None) -> dict:
    """tau over the answers; with `step_cost(T)` (a WindowStop's cost curve: target step time for
    T window tokens relative to one), also the predicted speedup over plain decoding,
    tokens / sum of step costs - the prefill and draft time left out."""
    steps = toks = 0
    cost = [0.0]

    def observe(w, answer, pos, a):
        cost[0] += step_cost(len(w.ids) + 1)

    for prompt, answer in pairs:
        s, t = replay(make_drafter(), prompt, answer, gamma, observe if step_cost else None)
        steps, toks = steps + s, toks + t
    r = {"tau": toks / max(steps, 1), "steps": steps, "tokens": toks}
    if step_cost:
        r["predicted_speedup"] = toks / max(cost[0], 1e-9)
    return r


def plot_scaling(rows: list[dict], path) -> None:
    """tau against the datastore's size (target-generated tokens), one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    lines: dict[str, list] = {}
    for r in rows:
        if "answers_used" in r:
            key = f"{r['mode']}, n<={r['store_n_max']}, count>={r['min_count']}"
            lines.setdefault(key, []).append((r["answer_tokens"], r["tau"]))
    for key, pts in lines.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    for r in rows:
        if "answers_used" not in r:
            ax.axhline(r["tau"], ls="--", lw=0.8, color="grey")
            ax.annotate(f"{r['datastore']} ({r['mode']})", (0.01, r["tau"]), xycoords=("axes fraction", "data"),
                        fontsize=7, va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("datastore text (target-generated tokens)")
    ax.set_ylabel(f"tau, vanilla SD, gamma={rows[0]['gamma']}")
    ax.set_title(f"n-gram draft on {rows[0]['answers']} held-out training answers")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from mirror.models.loader import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--answers", required=True, help="build-datastore folder of held-out training answers")
    ap.add_argument("--data", default=None, help="the training prompts file those answers came from")
    ap.add_argument("--datastore", nargs="*", default=["bundled"], help="datastores to compare ('none': context only)")
    ap.add_argument("--modes", nargs="+", default=["fill"], help="n-gram draft modes to compare")
    ap.add_argument("--build-from", default=None, metavar="FOLDER",
                    help="also compare datastores built here from the first N answers of this build-datastore folder")
    ap.add_argument("--sizes", type=int, nargs="*", default=[], help="N answers per built datastore (0: all)")
    ap.add_argument("--store-n-max", type=int, nargs="+", default=[4], help="built datastores: longest n-gram")
    ap.add_argument("--min-count", type=int, nargs="+", default=[2], help="built datastores: least count kept")
    ap.add_argument("--out", default=None, help="folder for results.json and scaling.png")
    ap.add_argument("--draft-model", default=None, metavar="DIR",
                    help="also replay this draft model (`mirror distill-draft`) alone and as ngram+model")
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--window-stop", nargs="*", default=[], metavar="FILE",
                    help="also replay with these window stops (mirror calibrate-stop; 'bundled'); rows then "
                         "carry a predicted speedup priced by the first one's step-cost curve")
    ap.add_argument("--ngram-min", type=int, default=2)
    ap.add_argument("--ngram-max", type=int, default=4)
    args = ap.parse_args(argv)
    tok, _ = load_tokenizer()
    pairs = load_answers(args.answers, tok, args.data)
    params = SamplingParams()
    stores = [({"datastore": ds}, None if ds == "none" else load_datastore(ds)) for ds in args.datastore]
    if args.build_from:
        lines = [json.loads(x) for x in (Path(args.build_from) / "answers.jsonl").read_text().splitlines()[1:] if x]
        answers = [r["ids"] for r in sorted(lines, key=lambda r: r["i"])]
        for n in args.sizes or [0]:
            for n_max in args.store_n_max:
                for mc in args.min_count:
                    store = NgramModel.build(answers[:n or None], 1, n_max, mc)
                    stores.append(({"datastore": args.build_from, "answers_used": len(answers[:n or None]),
                                    "store_n_max": n_max, "min_count": mc,
                                    "answer_tokens": sum(map(len, answers[:n or None]))}, store))
    rows = []
    if args.draft_model:
        from mirror.decoding.drafters.combined import CombinedDrafter

        preds, agree = network_predictions(args.draft_model, pairs)

        def nets():  # one ReplayNet per answer, in the order simulate() replays them
            return iter([ReplayNet(p, len(q)) for p, (q, _) in zip(preds, pairs)])

        net = nets()
        r = simulate(pairs, lambda: next(net), args.gamma)
        rows.append({"draft": "model", "draft_model": args.draft_model, "top1_agreement": agree,
                     "gamma": args.gamma, "answers": len(pairs), **r})
        tqdm.write(json.dumps(rows[-1]))
        for info, store in [({"datastore": "none"}, None)] + stores:
            for mode in args.modes:
                net = nets()  # the combination rule is CombinedDrafter's own
                r = simulate(pairs, lambda: CombinedDrafter(
                    params, NgramDrafter(params, args.ngram_min, args.ngram_max, datastore=store, mode=mode),
                    next(net)), args.gamma)
                rows.append({"draft": "ngram+model", **info, "mode": mode, "gamma": args.gamma,
                             "answers": len(pairs), **r})
                tqdm.write(json.dumps(rows[-1]))
    stops = [(None, None)] + [(f, load_window_stop(f)) for f in args.window_stop]
    costs = stops[1][1].step_cost if len(stops) > 1 else None  # every row priced by the first stop's curve
    for info, store in tqdm(stores, desc="datastores", unit="store", disable=len(stores) < 3):
        for mode in args.modes:
            for stop_name, stop in stops:
                if stop is not None and mode == "mixed":
                    continue
                r = simulate(pairs, lambda: NgramDrafter(params, args.ngram_min, args.ngram_max, datastore=store,
                                                         mode=mode, stop=stop), args.gamma, costs)
                row = {**info, "entries": len(store) if store else 0, "mode": mode, "gamma": args.gamma,
                       "window_stop": stop_name, "answers": len(pairs), **r}
                rows.append(row)
                tqdm.write(json.dumps(row))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
        if any("answers_used" in r for r in rows):
            plot_scaling(rows, out / "scaling.png")
            print(f"wrote {out / 'results.json'} and {out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
