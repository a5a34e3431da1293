"""Exit profile: how good the target's early exit is, what each stage costs, and which
(l_e, kappa, gamma) the latency law recommends for this model, draft and machine.

    python -m benchmarks.exit_profile --per-category 1 --max-new-tokens 64 --out runs/profile
    mirror bench ... --profile          # the same, written next to the bench results

1. Plain greedy decoding of each selected question (first turn), recording the hidden state
   leaving candidate exit layers l (the target prefix runs layers [0, l)); at every decoded
   position, with q the target's final distribution (temperature 1) and S the top-kappa ids of
   the early exit head(h_l):
     Omega_kappa(l) = mean over positions of q(S)          (target mass inside the set)
     hit_kappa(l)   = mean of [argmax q in S]              (the greedy token is in the set)
   Layer N (all layers) is included as a check: its hit is 1 for every kappa.
2. Stage times on a window of gamma+1 tokens after the first prompt: every target layer, the
   exit head (+ top-k) and the final head; the draft's serial proposal of gamma tokens; the
   in-process rendezvous hand-off (plus --rendezvous-ms of channel latency, e.g. 0.44 for gRPC).
3. A `mirror` run with the given spec on the same questions: measured step time, tau,
   acceptance, hit and miss rates.
4. Latency law (../shared/MIRROR_SD.md): T_M = T_prefix + T_rv + max(T_suffix, T_draft(gamma)) +
   T_rv, expected step time T_M + miss * T_draft(gamma), miss estimated as 1 - hit_kappa(l_e)
   (a lower bound: hypotheses past the budget miss too). Expected tau from the per-token
   acceptance alpha fitted to the measured tau: tau(gamma) = (1 - alpha^(gamma+1)) / (1 - alpha).
   The recommendation maximises expected tau / expected step time.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

DEFAULT_KAPPAS = (1, 2, 4, 8, 16)
DEFAULT_GAMMAS = (1, 3, 5, 7)


def candidate_layers(n_layers: int, every: int = 2) -> list[int]:
    """Every `every` layers plus N/2, 2N/3, 3N/4, 5N/6 and N (the check row)."""
    ls = set(range(every, n_layers, every))
    ls |= {n_layers // 2, (2 * n_layers) // 3, (3 * n_layers) // 4, (5 * n_layers) // 6, n_layers}
    return sorted(x for x in ls if 1 <= x <= n_layers)


# ---------------------------------------------------------------------------------------------
# 1. Omega by layer and kappa
# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def omega_on_prompt(model, prompt: list[int], max_new_tokens: int, layers: list[int], kappas,
                    eos: set[int]) -> tuple[list[int], torch.Tensor, torch.Tensor, int]:
    """Greedy decode recording exits. Returns (ids, mass [L, K], hits [L, K], positions)."""
    from mirror.decoding.ar import prefill

    N = model.cfg.n_layers
    kmax = max(kappas)
    kidx = torch.tensor([k - 1 for k in kappas])
    cache = model.new_cache(1, len(prompt) + max_new_tokens + 1)
    tok = int(prefill(model, cache, prompt).argmax())
    n = len(prompt)
    ids = [tok]
    bounds = sorted(set(layers) | {N})
    mass = torch.zeros(len(layers), len(kappas), dtype=torch.float64)
    hits = torch.zeros(len(layers), len(kappas), dtype=torch.float64)
    positions = 0
    while len(ids) < max_new_tokens and tok not in eos:
        pos = torch.tensor([[n]])
        h = model.embed(torch.tensor([[tok]]))
        states, start = {}, 0
        for b in bounds:
            h = model.forward_layers(h, pos, cache, start, b, kv_len=n + 1)
            states[b], start = h, b
        n += 1
        cache.set_length(0, n)
        exits = model.head(torch.cat([states[x] for x in layers], 1))[0].float()  # [L, V]
        final = model.head(states[N])[0, 0].float()  # [V]
        q = torch.softmax(final, -1)
        tok = int(final.argmax())
        top = exits.topk(kmax, dim=-1).indices  # [L, kmax]
        mass += q[top].cumsum(-1)[:, kidx].double()
        hits += (top == tok).cumsum(-1)[:, kidx].double()
        positions += 1
        ids.append(tok)
    return ids, mass, hits, positions


# ---------------------------------------------------------------------------------------------
# 2. Stage times
# ---------------------------------------------------------------------------------------------
def _median_time(fn, reps: int, warm: int = 1) -> float:
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


@torch.inference_mode()
def stage_times(model, prompt: list[int], gammas, kappa: int, reps: int = 5) -> dict:
    """Per gamma: seconds per target layer on a gamma+1 window, exit head + top-k, final head;
    and the plain decoding step (one token, all layers + head)."""
    from mirror.decoding.ar import prefill

    N = model.cfg.n_layers
    n = len(prompt)
    cache = model.new_cache(1, n + max(gammas) + 2)
    prefill(model, cache, prompt)
    out = {}
    for g in gammas:
        T = g + 1
        pos = torch.arange(n, n + T)[None]
        h = model.embed(torch.tensor([prompt[-T:]]))

        def layer(i):
            return lambda: model.forward_layers(h, pos, cache, i, i + 1, kv_len=n + T)

        per_layer = [_median_time(layer(i), reps) for i in range(N)]

        def exit_head():
            torch.log_softmax(model.head(h)[0].float(), -1).topk(kappa, dim=-1).indices.tolist()

        out[g] = {"layer_s": per_layer, "exit_head_s": _median_time(exit_head, reps),
                  "final_head_s": _median_time(lambda: model.head(h)[0].argmax(-1).tolist(), reps)}
        cache.set_length(0, n)
    tok = torch.tensor([[prompt[-1]]])
    posn = torch.tensor([[n]])
    out["ar_step_s"] = _median_time(lambda: int(model(tok, posn, cache, kv_len=n + 1)[0, -1].argmax()), reps)
    return out


def draft_times(model, spec, prompt: list[int], gammas, reps: int = 5) -> dict:
    """T_draft(gamma): the configured drafter's serial proposal of gamma tokens after a
    verdict (what a miss costs), median over reps."""
    from mirror.decoding.factory import build_drafter
    from mirror.decoding.messages import Verdict
    from mirror.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max(gammas) * (reps + 2) + 8)
    drafter = build_drafter(model, spec, params, len(prompt) + params.max_new_tokens + max(gammas) + 2)
    out = {}
    with torch.inference_mode():
        for g in gammas:
            drafter.start(list(prompt))
            drafter.propose(g)  # the draft's own prefill, not timed
            ts = []
            for _ in range(reps):
                drafter.commit(Verdict(0, 0, prompt[-1]))
                t = time.perf_counter()
                drafter.propose(g)
                ts.append(time.perf_counter() - t)
            out[g] = statistics.median(ts)
    return out


def rendezvous_time(gamma: int, kappa: int, reps: int = 50) -> float:
    """In-process hand-off: the signal's and verdict's host transfers (no channel)."""
    ids = torch.zeros(gamma + 1, kappa, dtype=torch.long)
    vals = torch.zeros(gamma + 1, kappa)
    return _median_time(lambda: (ids.tolist(), vals.exp().tolist(), int(ids[0, 0])), reps)


# ---------------------------------------------------------------------------------------------
# 3-4. Latency law
# ---------------------------------------------------------------------------------------------
def expected_tau(alpha: float, gamma: int) -> float:
    if alpha >= 1.0:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def fit_alpha(tau: float, gamma: int) -> float:
    """Per-token acceptance alpha with expected_tau(alpha, gamma) == tau (bisection)."""
    if tau <= 1.0:
        return 0.0
    if tau >= gamma + 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tau(mid, gamma) < tau else (lo, mid)
    return (lo + hi) / 2


def law(times: dict, draft: dict, t_rv: float, le: int, gamma: int, miss: float) -> dict:
    st = times[gamma]
    t_prefix = sum(st["layer_s"][:le]) + st["exit_head_s"]
    t_suffix = sum(st["layer_s"][le:]) + st["final_head_s"]
    t_m = t_prefix + t_rv + max(t_suffix, draft[gamma]) + t_rv
    return {"T_prefix_s": t_prefix, "T_suffix_s": t_suffix, "T_draft_s": draft[gamma], "T_rv_s": t_rv,
            "T_M_s": t_m, "expected_step_s": t_m + miss * draft[gamma]}


def profile(lm, questions: list[dict], max_new_tokens: int = 64, spec=None, layers=None,
            kappas=DEFAULT_KAPPAS, gammas=DEFAULT_GAMMAS, rendezvous_ms: float = 0.0, reps: int = 5,
            run_mirror: bool = True, progress: bool = True) -> dict:
    from tqdm import tqdm

    from mirror.decoding.factory import generate
    from mirror.sampling import SamplingParams
    from mirror.spec_config import SpecConfig

    from .bench import chat_ids
    from .specbench import category

    model, tok = lm.model, lm.tokenizer
    N = model.cfg.n_layers
    spec = spec or SpecConfig(method="mirror")
    if spec.method != "mirror":
        spec = SpecConfig.from_dict({**spec.to_dict(), "method": "mirror"})
    le_spec = spec.resolve_exit_layer(N)
    layers = sorted(set(layers or candidate_layers(N)) | {le_spec, N})
    kappas = sorted(set(kappas) | {spec.kappa})
    gammas = sorted(set(gammas) | {spec.gamma})
    prompts = [chat_ids(tok, [{"role": "user", "content": q["turns"][0]}]) for q in questions]
    if not prompts:
        raise ValueError("no questions to profile")

    mass = torch.zeros(len(layers), len(kappas), dtype=torch.float64)
    hits = torch.zeros_like(mass)
    npos = 0
    outputs = []
    for p, q in zip(tqdm(prompts, desc="exit profile", disable=not progress, file=sys.stderr), questions):
        ids, m, h, k = omega_on_prompt(model, p, max_new_tokens, layers, kappas, set(tok.eos_ids))
        mass += m
        hits += h
        npos += k
        outputs.append({"question_id": q.get("question_id"), "category": category(q), "positions": k,
                        "new_tokens": len(ids)})
    omega = (mass / max(npos, 1)).tolist()
    hit = (hits / max(npos, 1)).tolist()

    times = stage_times(model, prompts[0], gammas, max(kappas), reps)
    draft = draft_times(model, spec, prompts[0], gammas, reps)
    t_rv = rendezvous_time(spec.gamma, spec.kappa) + rendezvous_ms / 1e3

    measured = None
    if run_mirror:
        params = SamplingParams(max_new_tokens=max_new_tokens)
        ms = [generate(model, tok, p, params, spec).metrics for p in prompts]
        steps = sum(m.target_steps for m in ms)
        drafted, accepted = sum(m.drafted_tokens for m in ms), sum(m.accepted_tokens for m in ms)
        h_, m_ = sum(m.hits for m in ms), sum(m.misses for m in ms)
        measured = {"target_steps": steps, "step_s": sum(m.decode_s for m in ms) / max(steps, 1),
                    "tau": (accepted + steps) / steps if steps else 0.0,
                    "acceptance_rate": accepted / drafted if drafted else 0.0,
                    "hit_rate": h_ / (h_ + m_) if h_ + m_ else 0.0,
                    "miss_rate": m_ / (h_ + m_) if h_ + m_ else 0.0}
        alpha = fit_alpha(measured["tau"], spec.gamma)
    else:
        alpha = 0.0

    li = {l: i for i, l in enumerate(layers)}
    ki = {k: i for i, k in enumerate(kappas)}
    grid = []
    for le in layers:
        if le >= N:
            continue
        for kappa in kappas:
            miss = 1.0 - hit[li[le]][ki[kappa]]
            for g in gammas:
                r = law(times, draft, t_rv, le, g, miss)
                tau = expected_tau(alpha, g)
                grid.append({"exit_layer": le, "kappa": kappa, "gamma": g, "est_miss_rate": miss,
                             "expected_tau": tau, **r, "pred_tok_s": tau / r["expected_step_s"]})
    grid.sort(key=lambda r: -r["pred_tok_s"])
    at_spec = None
    if measured is not None:
        r = law(times, draft, t_rv, le_spec, spec.gamma, measured["miss_rate"])
        at_spec = {"exit_layer": le_spec, "kappa": spec.kappa, "gamma": spec.gamma, **r,
                   "measured_step_s": measured["step_s"],
                   "pred_tok_s": measured["tau"] / r["expected_step_s"],
                   "measured_tok_s": measured["tau"] / measured["step_s"] if measured["step_s"] else 0.0}
    sd_ar = {"ar_step_s": times["ar_step_s"], "ar_tok_s": 1.0 / times["ar_step_s"],
             "sd_pred_tok_s": {g: expected_tau(alpha, g) / (sum(times[g]["layer_s"]) + times[g]["final_head_s"]
                                                            + draft[g]) for g in gammas}}
    return {"config": {"model": lm.path, "n_layers": N, "questions": len(prompts), "positions": npos,
                       "max_new_tokens": max_new_tokens, "spec": spec.to_dict(), "layers": layers,
                       "kappas": kappas, "gammas": gammas, "rendezvous_ms_added": rendezvous_ms,
                       "threads": torch.get_num_threads()},
            "omega": omega, "top1_hit": hit, "stage_times": {str(k): v for k, v in times.items()},
            "draft_s": {str(g): v for g, v in draft.items()}, "rendezvous_s": t_rv,
            "measured": measured, "alpha": alpha, "at_spec": at_spec, "baselines": sd_ar,
            "recommended": grid[0] if grid else None, "grid": grid, "outputs": outputs}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def markdown(prof: dict) -> str:
    c = prof["config"]
    layers, kappas = c["layers"], c["kappas"]
    L = [f"# Exit profile: {os.path.basename(c['model'])} ({c['n_layers']} layers)", "",
         f"{c['questions']} prompts, {c['positions']} decoded positions, {c['threads']} threads. "
         "Omega = target mass inside the early-exit top-kappa set; hit = the greedy token is in it.", "",
         "## Omega_kappa (mass / hit) by exit layer", "",
         "| l_e | " + " | ".join(f"kappa={k}" for k in kappas) + " |", "|---" * (len(kappas) + 1) + "|"]
    for i, le in enumerate(layers):
        L.append(f"| {le} | " + " | ".join(f"{prof['omega'][i][j]:.2f} / {prof['top1_hit'][i][j]:.2f}"
                                           for j in range(len(kappas))) + " |")
    L += ["", "## Stage times (ms)", "", "| gamma | target layer (mean) | exit head | final head | draft(gamma) |",
          "|---|---|---|---|---|"]
    for g in c["gammas"]:
        st = prof["stage_times"][str(g)]
        L.append(f"| {g} | {1e3 * statistics.fmean(st['layer_s']):.2f} | {1e3 * st['exit_head_s']:.2f} | "
                 f"{1e3 * st['final_head_s']:.2f} | {1e3 * prof['draft_s'][str(g)]:.2f} |")
    b = prof["baselines"]
    L += ["", f"Plain decoding step {1e3 * b['ar_step_s']:.1f} ms ({b['ar_tok_s']:.1f} tok/s); rendezvous "
          f"{1e3 * prof['rendezvous_s']:.3f} ms; fitted per-token acceptance alpha {prof['alpha']:.2f}."]
    a = prof["at_spec"]
    if a:
        m = prof["measured"]
        L += ["", "## Latency law vs. measured at the given spec", "",
              f"l_e {a['exit_layer']}, kappa {a['kappa']}, gamma {a['gamma']}: T_prefix {1e3 * a['T_prefix_s']:.1f} ms, "
              f"T_suffix {1e3 * a['T_suffix_s']:.1f} ms, T_draft {1e3 * a['T_draft_s']:.1f} ms, T_M "
              f"{1e3 * a['T_M_s']:.1f} ms; predicted step (T_M + miss {m['miss_rate']:.2f} x T_draft) "
              f"{1e3 * a['expected_step_s']:.1f} ms vs. measured {1e3 * a['measured_step_s']:.1f} ms "
              f"(tau {m['tau']:.2f}, hit rate {m['hit_rate']:.2f}). The in-process runtime runs the draft's "
              "branch rollouts between prefix and suffix, not beside the suffix, so with a network draft "
              "it measures above the law."]
    best = prof["recommended"]
    sd = ", ".join(f"gamma {g}: {v:.1f}" for g, v in b["sd_pred_tok_s"].items())
    L += ["", f"Predicted vanilla SD tok/s with the same draft ({sd}); plain decoding {b['ar_tok_s']:.1f}."]
    if best and best["pred_tok_s"] < b["ar_tok_s"]:
        L.append("No Mirror-SD setting is predicted to beat plain decoding with this draft on this machine.")
    L += ["", "## Recommended (l_e, kappa, gamma) by predicted tok/s", "",
          "| l_e | kappa | gamma | est. miss | E[tau] | T_M ms | E[step] ms | pred tok/s |",
          "|---|---|---|---|---|---|---|---|"]
    for r in prof["grid"][:8]:
        L.append(f"| {r['exit_layer']} | {r['kappa']} | {r['gamma']} | {r['est_miss_rate']:.2f} | "
                 f"{r['expected_tau']:.2f} | {1e3 * r['T_M_s']:.1f} | {1e3 * r['expected_step_s']:.1f} | "
                 f"{r['pred_tok_s']:.1f} |")
    return "\n".join(L) + "\n"


def heatmap(prof: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = prof["config"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.3 * len(c["layers"]) + 2))
    for ax, key, title in zip(axes, ("omega", "top1_hit"), ("Omega_kappa (target mass in set)",
                                                            "greedy token in set")):
        data = prof[key]
        im = ax.imshow(data, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(c["kappas"])))
        ax.set_xticklabels(c["kappas"])
        ax.set_yticks(range(len(c["layers"])))
        ax.set_yticklabels(c["layers"])
        ax.set_xlabel("kappa")
        ax.set_ylabel("exit layer l_e")
        ax.set_title(title, fontsize=10)
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.5 else "black")
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(f"Early exit of {os.path.basename(c['model'])}, {c['positions']} positions")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_profile(prof: dict, out: str) -> dict:
    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "exit_profile.json"), "md": os.path.join(out, "exit_profile.md"),
             "png": os.path.join(out, "exit_profile.png")}
    with open(paths["json"], "w") as f:
        json.dump(prof, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(prof))
    heatmap(prof, paths["png"])
    return paths


def main(argv=None) -> int:
    import argparse

    from mirror.cli import _die, add_model_args, load_from_args
    from mirror.spec_config import SpecConfig

    from .specbench import WHERE, default_questions_path, load_questions, select

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--questions", default=None)
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--spec", default=None, help="SpecConfig fields as JSON (the draft and the point to measure)")
    ap.add_argument("--layers", type=int, nargs="+", default=None)
    ap.add_argument("--kappas", type=int, nargs="+", default=list(DEFAULT_KAPPAS))
    ap.add_argument("--gammas", type=int, nargs="+", default=list(DEFAULT_GAMMAS))
    ap.add_argument("--rendezvous-ms", type=float, default=0.0, help="channel latency added to each rendezvous")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="runs/profile")
    args = ap.parse_args(argv)
    qpath = args.questions or default_questions_path()
    if not qpath or not os.path.isfile(qpath):
        _die(f"no question file at {qpath or '../shared/specbench/question.jsonl'}; get {WHERE}")
    try:
        spec = SpecConfig.from_dict({"method": "mirror", **json.loads(args.spec or "{}")})
    except ValueError as e:
        _die(str(e))
    lm = load_from_args(args)
    prof = profile(lm, select(load_questions(qpath), args.per_category), args.max_new_tokens, spec,
                   args.layers, args.kappas, args.gammas, args.rendezvous_ms, args.reps)
    paths = write_profile(prof, args.out)
    print(open(paths["md"]).read())
    print(f"wrote {', '.join(paths.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
