"""`mirror bench`: every method on the same Spec-Bench questions, in one process, interleaved.

    mirror bench --per-category 1 --max-new-tokens 16 --methods ar sd:ngram mirror:ngram+self
    mirror bench --methods ar "mirror:self@gamma=3,draft_layers=2" --spec '{"kappa": 4}'

A method is `method[:draft][@key=value,...]`: `ar`, `sd:ngram`, `mirror:ngram+self@gamma=7`.
`--spec` / `--spec-file` give SpecConfig fields for every speculative method; `@...` overrides
them for one method. Plain decoding (`ar`) always runs: it is the baseline of every speedup
and of the identical-output count.

Measurement (matches Spec-Bench's evaluation/eval.py and evaluation/speed.py):
- A question's time is the wall time of each turn's generate call - prefill included, prompt
  encoding excluded - summed over its turns; its tokens are the new tokens summed over its
  turns; its speed is tokens / time.
- A method's speed on a category is the mean of its per-question speeds; its speedup is that
  mean divided by the plain-decoding mean of the same run on the same questions.
- MT-Bench's second turn: the conversation [user 1, assistant = the method's own first answer
  (decoded, stripped), user 2] with the chat template applied; both turns count.
Differences from Spec-Bench: new tokens are counted as generated ids without the EOS token for
every method (Spec-Bench re-tokenizes the baseline's text and counts the EOS for the others);
each method is warmed up on a short prompt first (Spec-Bench's warm-up is commented out); and
methods run interleaved per question in one process (Spec-Bench runs one method per process),
with the order rotated per question, so machine noise and position effects hit all alike.
Every finished question is appended to OUT/records.jsonl (the journal): a long run that stops
keeps what it measured, and `--resume` with the same settings runs only the questions left.
`tau` is pooled over all steps (Spec-Bench's mean accepted tokens), as are the acceptance,
hit and miss rates. `decode_speedup` is the same ratio with prefill time left out.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from .specbench import CATEGORIES, WHERE, category, default_questions_path, load_questions, select

BASELINE = "ar"
DEFAULT_METHODS = ("ar", "sd:ngram", "mirror:ngram+self")


# ---------------------------------------------------------------------------------------------
# Engines: what runs one generation. The distributed runtime plugs in here.
# ---------------------------------------------------------------------------------------------
class Engine(Protocol):
    """Runs one request: prompt ids + sampling params + spec (None = plain) -> GenerationResult."""

    name: str

    def generate(self, prompt_ids: list[int], params, spec): ...


class InProcessEngine:
    """Target and draft pipelines in this process (mirror.decoding.factory.generate). Draft
    networks are built once per spec, outside the timed calls, like loading the model."""

    name = "inprocess"

    def __init__(self, lm):
        self.model, self.tokenizer = lm.model, lm.tokenizer
        self._nets: dict[str, object] = {}

    def _net(self, spec):
        from mirror.decoding.factory import build_draft_net

        kind = next((k for k in spec.draft.split("+") if k != "ngram"), None)
        if kind is None:
            return None
        key = json.dumps(spec.to_dict(), sort_keys=True)
        if key not in self._nets:
            self._nets[key] = build_draft_net(self.model, spec, kind)
        return self._nets[key]

    def generate(self, prompt_ids, params, spec):
        from mirror.decoding.factory import build_drafter, draft_max_len, generate

        if spec is None or spec.method == "ar":
            return generate(self.model, self.tokenizer, prompt_ids, params)
        drafter = build_drafter(self.model, spec, params, draft_max_len(len(prompt_ids), params, spec),
                                net=self._net(spec))
        return generate(self.model, self.tokenizer, prompt_ids, params, spec, drafter=drafter)


def onnx_engine(lm, specs) -> InProcessEngine:
    """The in-process engine over the same weights on the onnx target backend, its layers cut
    at every Mirror-SD method's exit layer (built once, outside the timed calls)."""
    import dataclasses

    import torch

    from mirror.models.ort_target import OrtTarget

    n = lm.model.cfg.n_layers
    splits = sorted({s.resolve_exit_layer(n) for s in specs if s is not None and s.method == "mirror"})
    t = time.perf_counter()
    target = OrtTarget(lm.model, splits=splits, threads=torch.get_num_threads())
    print(f"mirror bench: onnx target backend built in {time.perf_counter() - t:.1f} s (segments "
          f"{target.bounds}; ONNX Runtime pool {target.pool})", file=sys.stderr)
    return OnnxInProcessEngine(dataclasses.replace(lm, model=target))


class OnnxInProcessEngine(InProcessEngine):
    """In-process on the onnx target: PyTorch on one thread during each call (host_threads)."""

    def generate(self, prompt_ids, params, spec):
        from mirror.models.ort_target import host_threads

        with host_threads(1):
            return super().generate(prompt_ids, params, spec)


class DistributedBenchEngine:
    """The distributed runtime (Ray actors + the gRPC token channel) of a deployment config,
    embedded by default: every method, `ar` included, runs on the target worker (its own
    cores), the draft on the draft worker. Each call is one request end to end."""

    name = "distributed"

    def __init__(self, lm, config: str | None = None):
        import dataclasses

        from mirror.runtime.cluster import DistributedEngine
        from mirror.runtime.config import DeploymentConfig

        deploy = DeploymentConfig.load(config) if config else DeploymentConfig.local()
        self.tokenizer = lm.tokenizer
        self.engine = DistributedEngine(dataclasses.replace(deploy, model=deploy.model))
        self.deploy = deploy
        import ray

        # target.backend "auto" is decided on the target worker: every method runs on that backend
        self.target_backend = ray.get(self.engine.runtime.targets[0].info.remote()).get("backend", "torch")
        print(f"mirror bench: distributed target backend {self.target_backend}", file=sys.stderr)

    def generate(self, prompt_ids, params, spec):
        import asyncio

        from mirror.decoding.result import GenerationResult, Metrics
        from mirror.engine import GenerateArgs
        from mirror.spec_config import SpecConfig

        spec = spec or SpecConfig(method="ar")

        async def go():
            async for _ in self.engine.generate(GenerateArgs(prompt_ids, params, spec), asyncio.Event()):
                pass

        asyncio.run(go())
        final = self.engine.completed[-1]
        if final.get("finish_reason") == "error":
            raise RuntimeError(final.get("error"))
        md = dict(final["metrics"])
        m = Metrics(**{k: md[k] for k in Metrics.__dataclass_fields__ if k in md})
        m.extra["degraded"] = final.get("degraded")
        return GenerationResult(final["ids"], self.tokenizer.decode(final["ids"]), final["finish_reason"], m,
                                method=spec.method)

    def close(self) -> None:
        import ray

        self.engine.runtime.shutdown()
        ray.shutdown()


ENGINES: dict[str, Callable[..., Engine]] = {"inprocess": InProcessEngine, "distributed": DistributedBenchEngine}
# Runtimes the CLI offers before they exist, with what to say when asked for.
UNAVAILABLE: dict[str, str] = {}


def register_engine(name: str, factory: Callable[..., Engine]) -> None:
    """Make `--runtime name` build its engine with `factory(loaded_model)`."""
    ENGINES[name] = factory
    UNAVAILABLE.pop(name, None)


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Method:
    label: str
    spec: object | None  # SpecConfig, None for plain decoding and peers
    engine: Engine
    peer: bool = False
    backend: str = "torch"  # the target's backend (see method_backend)


TARGET_BACKENDS = ("torch", "onnx")


def method_backend(text: str) -> tuple[str, str]:
    """Split a `target_backend=torch|onnx` setting off a method label: 'ar@target_backend=onnx'
    -> ('ar', 'onnx'); 'mirror:ngram@gamma=3,target_backend=onnx' -> ('mirror:ngram@gamma=3',
    'onnx'). The backend is how the target runs (mirror.models.ort_target), not part of the spec."""
    head, at, over = text.partition("@")
    keep, backend = [], "torch"
    for kv in filter(None, over.split(",")):
        k, _, v = kv.partition("=")
        if k.strip().replace("-", "_") == "target_backend":
            backend = v.strip()
            if backend not in TARGET_BACKENDS:
                raise ValueError(f"{text!r}: target_backend must be one of {', '.join(TARGET_BACKENDS)}, "
                                 f"got {backend!r}")
        else:
            keep.append(kv)
    return head + ("@" + ",".join(keep) if keep else ""), backend


# where and how the draft worker runs its network: its deployment's, never a request's (the token
# channel does not carry them - see mirror.runtime.channel._wire_fields)
DRAFT_PLACEMENT = ("draft_backend", "onnx_dir", "onnx_providers", "onnx_strict", "onnx_threads",
                   "onnx_inter_threads", "onnx_max_len")


def _settings(label: str) -> list[str]:
    return [kv.partition("=")[0].strip().replace("-", "_") for kv in filter(None, label.partition("@")[2].split(","))]


def reference_label(label: str, labels: list[str]) -> str:
    """The plain-decoding run a method's outputs and same-target speedup are compared with:
    `ar` on the method's target backend when the run has it, else the baseline."""
    backend = method_backend(label)[1]
    same = next((lb for lb in labels if method_backend(lb) == ("ar", backend)), None)
    return same or BASELINE


def parse_method(text: str, base: dict) -> tuple[str, object | None]:
    """'mirror:ngram+self@gamma=3,kappa=4' -> (label, SpecConfig); 'ar' -> ('ar', None).
    A `target_backend=...` setting stays in the label and out of the spec."""
    from mirror.spec_config import SpecConfig

    label = text
    text = method_backend(text)[0]
    head, _, over = text.partition("@")
    method, _, draft = head.partition(":")
    if method == "ar":
        if draft or over:
            raise ValueError(f"{label!r}: plain decoding takes no draft or settings (but target_backend)")
        return label, None
    d = dict(base)
    d["method"] = method
    if draft:
        d["draft"] = draft
    for kv in filter(None, over.split(",")):
        k, eq, v = kv.partition("=")
        if not eq:
            raise ValueError(f"{label!r}: expected key=value after '@', got {kv!r}")
        try:
            d[k.strip().replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            d[k.strip().replace("-", "_")] = v
    return label, SpecConfig.from_dict(d)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    if tokenizer.chat_template:
        return tokenizer.encode_chat(messages)
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    return tokenizer.encode(text)


def ids_hash(ids: list[int]) -> str:
    return hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:16]


def run_turns(method: Method, tokenizer, turns: list[str], params) -> tuple[list[dict], list[list[int]]]:
    """All turns of one question, Spec-Bench style: each later turn's history holds the
    method's own earlier answers. Returns per-turn records and per-turn output ids."""
    msgs: list[dict] = []
    records, outs = [], []
    for user in turns:
        msgs.append({"role": "user", "content": user})
        prompt = chat_ids(tokenizer, msgs)
        t0 = time.perf_counter()
        res = method.engine.generate(prompt, params, method.spec)
        wall = time.perf_counter() - t0
        m = res.metrics
        records.append({"prompt_tokens": len(prompt), "prompt_sha1": ids_hash(prompt),
                        "new_tokens": len(res.ids), "wall_s": wall, "ids_sha1": ids_hash(res.ids),
                        "finish_reason": res.finish_reason, "text": res.text, "metrics": m.to_dict()})
        outs.append(list(res.ids))
        msgs.append({"role": "assistant", "content": res.text.strip()})
    return records, outs


def question_record(turns: list[dict], identical: bool | None) -> dict:
    tok = sum(t["new_tokens"] for t in turns)
    wall = sum(t["wall_s"] for t in turns)
    dec = sum(t["metrics"]["decode_s"] for t in turns)
    if any(t["metrics"]["extra"].get("no_prefill_split") for t in turns):
        dec = None  # peers time the whole call only
    return {"new_tokens": tok, "wall_s": wall, "tok_s": tok / wall if wall > 0 else 0.0,
            "decode_s": dec, "decode_tok_s": tok / dec if dec else None,
            "identical_to_ar": identical, "turns": turns}


def run_bench(methods: list[Method], tokenizer, questions: list[dict], params, warmup: int = 1,
              progress: bool = True, done: list[dict] | None = None,
              on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Interleave: for each question, every method (order rotated per question).

    `done`: records of the first questions from an earlier, interrupted run (`--resume`); they
    are kept and their questions skipped. `on_record` sees each new record as it completes (the
    journal)."""
    from tqdm import tqdm

    out = list(done or [])
    if len(out) >= len(questions):
        return out

    if warmup and questions:
        from mirror.sampling import SamplingParams

        wp = SamplingParams(max_new_tokens=min(8, params.max_new_tokens), temperature=params.temperature,
                            seed=params.seed)
        for m in methods:
            for _ in range(warmup):
                m.engine.generate(chat_ids(tokenizer, [{"role": "user", "content": "Hello!"}]), wp, m.spec)
    bar = tqdm(total=len(questions) * len(methods), initial=len(out) * len(methods), desc="bench", unit="run",
               disable=not progress, file=sys.stderr)
    for i in range(len(out), len(questions)):
        q = questions[i]
        t_q = time.perf_counter()
        k = i % len(methods)
        order = methods[k:] + methods[:k]
        recs, ids = {}, {}
        for m in order:
            bar.set_postfix_str(f"{category(q)} {m.label}")
            recs[m.label], ids[m.label] = run_turns(m, tokenizer, q["turns"], params)
            bar.update(1)
        labels = [m.label for m in methods]
        out.append({"question_id": q.get("question_id", i), "category": category(q),
                    "n_turns": len(q["turns"]), "bench_s": time.perf_counter() - t_q,
                    "methods": {m.label: question_record(
                        recs[m.label], ids[m.label] == ids[reference_label(m.label, labels)] if params.greedy else None)
                        for m in methods}})
        if on_record is not None:
            on_record(out[-1])
    bar.close()
    return out


# ---------------------------------------------------------------------------------------------
# Journal: every finished question is appended to OUT/records.jsonl, so a long run that is
# interrupted keeps its questions and `--resume` goes on from the first one missing.
# ---------------------------------------------------------------------------------------------
JOURNAL = "records.jsonl"
# what must match for records of an earlier run to count in this one
RUN_KEYS = ("questions_file", "per_category", "max_new_tokens", "temperature", "seed", "methods", "specs",
            "runtime", "model", "dtype", "target_backend")


def run_key(config: dict) -> dict:
    return {k: config.get(k) for k in RUN_KEYS}


def load_journal(path: str, config: dict, questions: list[dict]) -> list[dict]:
    """Records of an earlier run with the same settings, in question order. Raises ValueError
    when the journal belongs to another run (other methods, questions, tokens, ...)."""
    with open(path) as f:
        raw = [line for line in f if line.strip()]
    lines = []
    for n, line in enumerate(raw):
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(raw) - 1 and n > 0:
                break  # the last record's write was cut by the stop: that question runs again
            raise ValueError(f"{path}: line {n + 1} is not JSON") from None
    if not lines or "run" not in lines[0]:
        raise ValueError(f"{path}: not a mirror bench journal")
    theirs, ours = lines[0]["run"], run_key(config)
    diff = [k for k in RUN_KEYS if theirs.get(k) != ours.get(k)]
    if diff:
        raise ValueError(f"{path} is from a run with other settings ({', '.join(diff)} differ); "
                         f"use another --out or drop --resume")
    recs = [r for r in lines[1:] if "question_id" in r]
    for i, r in enumerate(recs):
        if i >= len(questions) or r["question_id"] != questions[i].get("question_id", i):
            raise ValueError(f"{path}: record {i + 1} (question {r['question_id']}) does not match the "
                             f"selected questions; use another --out or drop --resume")
    return recs


class Journal:
    def __init__(self, path: str, config: dict, records: list[dict]):
        self.path = path
        with open(path, "w") as f:  # rewritten whole: header + the records kept
            f.write(json.dumps({"run": run_key(config)}) + "\n")
            for r in records:
                f.write(json.dumps(r) + "\n")

    def __call__(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def summarize(records: list[dict], labels: list[str]) -> dict:
    """{category or 'overall': {label: stats}}, Spec-Bench's speedup and pooled counters."""
    cats = [c for c in CATEGORIES if any(r["category"] == c for r in records)]
    cats += sorted({r["category"] for r in records} - set(cats))
    out = {}
    for cat in cats + ["overall"]:
        rs = [r for r in records if cat == "overall" or r["category"] == cat]
        if not rs:
            continue
        base_tok_s = statistics.fmean(r["methods"][BASELINE]["tok_s"] for r in rs)
        base_dec = statistics.fmean(r["methods"][BASELINE]["decode_tok_s"] for r in rs)
        out[cat] = {}
        for label in labels:
            ref = reference_label(label, labels)
            ref_tok_s = statistics.fmean(r["methods"][ref]["tok_s"] for r in rs)
            qs = [r["methods"][label] for r in rs]
            ms = [t["metrics"] for q in qs for t in q["turns"]]
            steps = sum(m["target_steps"] for m in ms)
            drafted = sum(m["drafted_tokens"] for m in ms)
            accepted = sum(m["accepted_tokens"] for m in ms)
            hits, misses = sum(m["hits"] for m in ms), sum(m["misses"] for m in ms)
            tok_s = statistics.fmean(q["tok_s"] for q in qs)
            decs = [q["decode_tok_s"] for q in qs]
            dec = None if None in decs else statistics.fmean(decs)
            ident = [q["identical_to_ar"] for q in qs]
            out[cat][label] = {
                "questions": len(qs), "tok_s": tok_s, "speedup": _ratio(tok_s, base_tok_s),
                "reference": ref, "speedup_same_target": _ratio(tok_s, ref_tok_s),
                "decode_tok_s": dec, "decode_speedup": None if dec is None else _ratio(dec, base_dec),
                "tau": (accepted + steps) / steps if steps else None,
                "acceptance_rate": accepted / drafted if drafted else None,
                "hit_rate": hits / (hits + misses) if hits + misses else None,
                "miss_rate": misses / (hits + misses) if hits + misses else None,
                "identical": None if any(v is None for v in ident) else sum(ident),
                "new_tokens": sum(q["new_tokens"] for q in qs),
                "degraded": sum(1 for q in qs if degraded_reason(q)),
            }
    return out


def degraded_reason(q: dict) -> str | None:
    """Why a question's method ran without its draft (the runtime's `degraded`: the draft
    failed and the target finished alone - same output, no speculation), or None."""
    return next((t["metrics"].get("extra", {}).get("degraded") for t in q["turns"]
                 if t["metrics"].get("extra", {}).get("degraded")), None)


def degraded_warnings(summary: dict, records: list[dict], labels: list[str]) -> list[str]:
    """One line per method with questions that ran degraded: their speedups do not measure it."""
    out = []
    for lb in labels:
        n = summary.get("overall", {}).get(lb, {}).get("degraded", 0)
        if n:
            why = next(r for r in (degraded_reason(q["methods"][lb]) for q in records) if r)
            out.append(f"{lb}: {n} of {summary['overall'][lb]['questions']} questions ran without their draft "
                       f"(the target finished alone; first reason: {why}) - its figures do not measure the method")
    return out


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(summary: dict, labels: list[str], config: dict, records: list[dict] | None = None) -> str:
    cats = list(summary)
    lines = [f"# mirror bench: {config['questions_file']}", "",
             f"{config['n_questions']} questions, max_new_tokens {config['max_new_tokens']}, temperature "
             f"{config['temperature']}, {config['threads']} threads, runtime {config['runtime']} (target "
             f"backend: {config.get('target_backend', 'torch')}), model {os.path.basename(config['model'])}.", "",
             "Speedup = mean per-question tok/s (wall time incl. prefill, all turns) / the same for "
             "plain decoding (`ar`) in this run (Spec-Bench's definition).", "",
             "## Speedup", "",
             "| method | " + " | ".join(cats) + " |", "|---" * (len(cats) + 1) + "|"]
    for lb in labels:
        lines.append(f"| {lb} | " + " | ".join(_f(summary[c][lb]["speedup"], "{:.2f}x") for c in cats) + " |")
    warn = degraded_warnings(summary, records or [], labels)
    if warn:
        lines += ["", "## Warning: the draft failed", ""] + [f"- {w}" for w in warn]
    other = [lb for lb in labels if summary[cats[-1]][lb].get("reference", BASELINE) != BASELINE]
    if other:
        lines += ["", "## Speedup over plain decoding on the same target backend", "",
                  "Methods run on another target backend (`target_backend=`) against `ar` on that backend; "
                  "'identical to ar' below is against that run too.", "",
                  "| method | reference | " + " | ".join(cats) + " |", "|---" * (len(cats) + 2) + "|"]
        for lb in other:
            lines.append(f"| {lb} | {summary[cats[-1]][lb]['reference']} | " +
                         " | ".join(_f(summary[c][lb]["speedup_same_target"], "{:.2f}x") for c in cats) + " |")
    lines += ["", "## Details", "",
              "| category | method | tok/s | speedup | decode speedup | tau | acceptance | hit | miss "
              "| identical to ar |", "|---" * 10 + "|"]
    for c in cats:
        for lb in labels:
            s = summary[c][lb]
            ident = "-" if s["identical"] is None else f"{s['identical']}/{s['questions']}"
            lines.append(f"| {c} | {lb} | {_f(s['tok_s'], '{:.1f}')} | {_f(s['speedup'], '{:.2f}x')} | "
                         f"{_f(s['decode_speedup'], '{:.2f}x')} | {_f(s['tau'])} | {_f(s['acceptance_rate'])} | "
                         f"{_f(s['hit_rate'])} | {_f(s['miss_rate'])} | {ident} |")
    return "\n".join(lines) + "\n"


def plot_speedups(summary: dict, labels: list[str], path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(summary)
    shown = [lb for lb in labels if lb != BASELINE]
    fig, ax = plt.subplots(figsize=(min(14.0, 2 + len(cats) * (0.6 + 0.35 * len(shown))), 4 + 0.25 * len(shown)))
    width = 0.8 / max(1, len(shown))
    for i, lb in enumerate(shown):
        xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(cats))]
        ys = [summary[c][lb]["speedup"] or 0.0 for c in cats]
        bars = ax.bar(xs, ys, width, label=legend_label(lb))
        for b, y in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, y, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=20)
    ax.set_ylabel("speedup over plain decoding")
    ax.set_title(title or "Spec-Bench speedup by category")
    ax.set_ylim(0, 1.12 * max([summary[c][lb]["speedup"] or 0.0 for c in cats for lb in shown] + [1.0]))
    if shown:  # below the axes: long method labels must not cover the bars' figures
        one_column = len(shown) > 3 or max(map(len, shown)) > 40  # long specs: one method a line
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1 if one_column else len(shown),
                  frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # grows the canvas to hold the legend
    plt.close(fig)
    return path


def legend_label(label: str, width: int = 110) -> str:
    """A method label for the chart's legend: a long spec wrapped at its commas."""
    import textwrap

    return "\n".join(textwrap.wrap(label.replace(",", ", "), width, break_on_hyphens=False)).replace(", ", ",")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def add_args(p) -> None:
    from mirror.cli import add_model_args

    add_model_args(p)
    p.add_argument("--questions", default=None,
                   help="Spec-Bench-format question file (default: ../shared/specbench/question.jsonl)")
    p.add_argument("--per-category", type=int, default=None, help="first N questions of each category")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="method[:draft][@key=value,...], e.g. ar sd:ngram mirror:ngram+self@gamma=7")
    p.add_argument("--spec", default=None, help='SpecConfig fields as JSON for all methods, e.g. \'{"gamma": 5}\'')
    p.add_argument("--spec-file", default=None, help="SpecConfig fields as a JSON file")
    p.add_argument("--runtime", default="inprocess", choices=sorted(set(ENGINES) | set(UNAVAILABLE)),
                   help="inprocess: both pipelines in this process; distributed: the Ray/gRPC runtime "
                        "of --config (default: the embedded local deployment)")
    p.add_argument("--config", default=None, metavar="YAML", help="deployment config for --runtime distributed")
    p.add_argument("--out", default="runs/bench", help="output folder")
    p.add_argument("--warmup", type=int, default=1, help="warm-up generations per method")
    p.add_argument("--peers", action="store_true",
                   help="also run Hugging Face transformers on the same weights (needs .[peers])")
    p.add_argument("--peer-draft-layers", type=int, default=4,
                   help="assisted generation's draft: the target's first k layers")
    p.add_argument("--peer-modes", nargs="+", default=None, metavar="MODE",
                   help="which peers to run: plain pld assisted (default: all that fit)")
    p.add_argument("--peer-draft-model", default=None, metavar="DIR",
                   help="assisted generation's draft: this Hugging Face folder instead (e.g. mirror distill-draft's model/)")
    p.add_argument("--trace-one", default=None, metavar="PATH",
                   help="after the run, trace one request of the first speculative method to PATH "
                        "(Chrome trace JSON) and PATH.png")
    p.add_argument("--profile", action="store_true",
                   help="also write the exit profile (benchmarks.exit_profile) into --out")
    p.add_argument("--resume", action="store_true",
                   help=f"keep the questions an interrupted run with the same settings finished "
                        f"(OUT/{JOURNAL}) and run the rest")
    p.add_argument("--no-progress", action="store_true")


def base_spec(args) -> dict:
    d: dict = {}
    if args.spec_file:
        with open(args.spec_file) as f:
            d.update(json.load(f))
    if args.spec:
        d.update(json.loads(args.spec))
    d.pop("method", None)
    return d


def cmd_bench(args) -> int:
    from mirror.cli import _die, load_from_args
    from mirror.sampling import SamplingParams

    qpath = args.questions or default_questions_path()
    if not qpath or not os.path.isfile(qpath):
        _die(f"no question file at {qpath or '../shared/specbench/question.jsonl'}; get {WHERE}", 2)
    try:
        questions = select(load_questions(qpath), args.per_category)
        base = base_spec(args)
        labels = list(dict.fromkeys([BASELINE] + list(args.methods)))
        if args.peers:  # before the model loads: a typo in --peer-modes fails at once
            from .peers import check_modes

            check_modes(args.peer_modes)
        parsed = [parse_method(m, base) for m in labels]
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                seed=args.seed if args.temperature > 0 else None)
    except (ValueError, OSError) as e:
        _die(str(e))
    if not questions:
        _die(f"{qpath}: no questions selected")
    placed = sorted({k for label, _ in parsed for k in _settings(label) if k in DRAFT_PLACEMENT}
                    | {k for k in base if k in DRAFT_PLACEMENT})
    if placed and args.runtime == "distributed":
        _die(f"{', '.join(placed)} in a method label is for --runtime inprocess; the distributed runtime's "
             f"draft worker takes them from its deployment config (--config: draft.backend, draft.onnx_max_len, ...)")
    if args.runtime not in ENGINES:
        _die(UNAVAILABLE.get(args.runtime, f"unknown runtime {args.runtime!r}"))
    lm = load_from_args(args)
    engine = ENGINES[args.runtime](lm, args.config) if args.runtime == "distributed" else ENGINES[args.runtime](lm)
    backends = {label: method_backend(label)[1] for label, _ in parsed}
    engines = {"torch": engine}
    if any(b == "onnx" for b in backends.values()):
        if args.runtime != "inprocess":
            _die("target_backend in a method label is for --runtime inprocess; the distributed runtime "
                 "takes target.backend from its deployment config")
        engines["onnx"] = onnx_engine(lm, [spec for label, spec in parsed if backends[label] == "onnx"])
    if getattr(engine, "target_backend", None) is not None:  # a runtime whose deployment chose the backend
        backends = {label: engine.target_backend for label in backends}
        engines = {engine.target_backend: engine}
    methods = [Method(label, spec, engines[backends[label]], backend=backends[label]) for label, spec in parsed]
    if args.peers:
        from .peers import PeersUnavailable, peer_methods

        try:
            methods += peer_methods(lm, draft_layers=args.peer_draft_layers, draft_model=args.peer_draft_model,
                                    modes=args.peer_modes)
        except PeersUnavailable as e:
            print(f"mirror bench: --peers skipped: {e}", file=sys.stderr)
    import torch

    os.makedirs(args.out, exist_ok=True)
    config = {"questions_file": os.path.abspath(qpath), "n_questions": len(questions),
              "per_category": args.per_category, "max_new_tokens": args.max_new_tokens,
              "temperature": args.temperature, "seed": params.seed, "methods": [m.label for m in methods],
              "specs": {m.label: (m.spec.to_dict() if m.spec is not None else None) for m in methods},
              "runtime": args.runtime, "model": lm.path, "dtype": args.dtype,
              "target_backend": getattr(engine, "target_backend", "torch unless a method label sets target_backend"),
              "threads": torch.get_num_threads(), "warmup": args.warmup,
              "python": platform.python_version(), "torch": torch.__version__,
              "machine": platform.machine(), "cpu_count": os.cpu_count(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    jpath = os.path.join(args.out, JOURNAL)
    done: list[dict] = []
    if args.resume and os.path.isfile(jpath):
        try:
            done = load_journal(jpath, config, questions)
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            _die(f"--resume: {e}")
        print(f"mirror bench: resuming after {len(done)} of {len(questions)} questions from {jpath}",
              file=sys.stderr)
    journal = Journal(jpath, config, done)
    t0 = time.perf_counter()
    records = run_bench(methods, lm.tokenizer, questions, params, warmup=args.warmup,
                        progress=not args.no_progress, done=done, on_record=journal)
    config["elapsed_s"] = time.perf_counter() - t0
    config["resumed_questions"] = len(done)
    # all questions' time, earlier runs' included (methods only: no model load, no warm-up)
    config["questions_s"] = sum(r.get("bench_s", 0.0) for r in records)
    labels = [m.label for m in methods]
    summary = summarize(records, labels)
    paths = write_results(args.out, config, summary, records, labels)
    print(open(paths["md"]).read())
    warn = degraded_warnings(summary, records, labels)
    if args.trace_one:
        spec_methods = sorted((m for m in methods if m.spec is not None), key=lambda m: m.spec.method != "mirror")
        if spec_methods:
            tpaths = trace_request(spec_methods[0], lm.tokenizer, questions[0]["turns"][0], params, args.trace_one)
            print(f"trace of one {spec_methods[0].label} request: {', '.join(tpaths)}")
    if args.profile:
        from .exit_profile import profile, write_profile

        spec = next((m.spec for m in methods if m.spec is not None and m.spec.method == "mirror"), None)
        prof = profile(lm, questions, max_new_tokens=args.max_new_tokens, spec=spec, progress=not args.no_progress)
        for p in write_profile(prof, args.out).values():
            print(f"exit profile: {p}")
    print(f"wrote {', '.join(paths.values())}")
    if hasattr(engine, "close"):
        engine.close()
    for w in warn:
        print(f"mirror bench: warning: {w}", file=sys.stderr)
    return 1 if warn else 0


def write_results(out: str, config: dict, summary: dict, records: list[dict], labels: list[str]) -> dict:
    paths = {"json": os.path.join(out, "results.json"), "md": os.path.join(out, "results.md"),
             "png": os.path.join(out, "speedup.png")}
    with open(paths["json"], "w") as f:
        json.dump({"config": config, "summary": summary, "questions": records}, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(summary, labels, config, records))
    plot_speedups(summary, labels, paths["png"],
                  f"Spec-Bench speedup, {config['n_questions']} questions, {config['max_new_tokens']} tokens")
    return paths


def trace_request(method: Method, tokenizer, prompt: str, params, path: str) -> list[str]:
    """Trace one generation of `method` to a Chrome trace JSON and a Gantt PNG."""
    from mirror import trace

    from .timeline import render_gantt

    ids = chat_ids(tokenizer, [{"role": "user", "content": prompt}])
    with trace.recording() as rec:
        with trace.span("request", "request", method=method.label):
            method.engine.generate(ids, params, method.spec)
    rec.save(path)
    png = os.path.splitext(path)[0] + ".png"
    render_gantt(rec.chrome_events(), png, title=f"{method.label}: first steps of one request")
    return [path, png]


def main(argv: Iterable[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="mirror bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    return cmd_bench(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
