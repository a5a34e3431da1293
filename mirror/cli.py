"""`mirror` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _die(msg: str, code: int = 2) -> None:
    print(f"mirror: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16}[name]


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="GGUF file or Hugging Face folder (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def add_spec_args(p: argparse.ArgumentParser) -> None:
    """Speculative settings; each one given overrides the base config (see spec_from_args)."""
    from .spec_config import CATCH_UPS, DRAFT_BACKENDS, DRAFT_PREFILLS, DRAFTS, METHODS, ROLLOUT_STOPS, RULES

    S = argparse.SUPPRESS
    g = p.add_argument_group("speculative decoding (defaults: the deployment config's)")
    g.add_argument("--method", default=S, choices=METHODS)
    g.add_argument("--draft", default=S, choices=DRAFTS)
    g.add_argument("--gamma", type=int, default=S, help="draft window")
    g.add_argument("--kappa", type=int, default=S, help="early-exit candidates per position")
    g.add_argument("--exit-layer", type=int, default=S, help="l_e (0 = 2N/3)")
    g.add_argument("--budget", type=int, default=S, help="hypotheses expanded per step")
    g.add_argument("--branch-batch", type=int, default=S)
    g.add_argument("--confidence", type=float, default=S, help="draft early-stop threshold")
    g.add_argument("--draft-layers", type=int, default=S, help="self-draft depth k")
    g.add_argument("--draft-model", default=S,
                   help="separate draft model (GGUF or HF folder); 'target': a copy of the target (with --draft-quant)")
    g.add_argument("--draft-quant", default=S, choices=["none", "int8", "gguf"],
                   help="a 'model' draft's linear layers as int8 (e.g. --draft model --draft-model target --draft-quant int8), "
                        "or 'gguf': the GGUF file's own 4-bit blocks under ONNX Runtime (--draft-backend onnx)")
    g.add_argument("--int8-calib", default=S,
                   help="SmoothQuant statistics for an int8 draft (mirror calibrate-int8); 'bundled': the default model's")
    g.add_argument("--adapter", default=S, help="trained draft artifact (mirror train-draft)")
    g.add_argument("--exit-head", default=S, help="trained early-exit head artifact; 'bundled': the one shipped for the default model")
    g.add_argument("--vocab-trim", default=S, help="VocabTrim token set (JSON); 'bundled': shipped for the default model; 'none': no trim")
    g.add_argument("--streams", type=int, default=S, help="speculative-streaming lookahead streams")
    g.add_argument("--stream-layers", type=int, default=S)
    g.add_argument("--rule", default=S, choices=RULES, help="acceptance rule at temperature > 0")
    g.add_argument("--ngram-datastore", default=S, help="n-gram datastore of the target's text (train-draft); 'bundled': shipped for the default model")
    g.add_argument("--window-stop", default=S, help="cut n-gram windows where more tokens cost more than they "
                   "return (mirror calibrate-stop); 'bundled': shipped for the default model")
    g.add_argument("--combine-min", type=float, default=S,
                   help="ngram+network drafts: the n-gram window only when the target is expected to accept "
                        "at least this many of its tokens (window-stop table), else the network's (0: always)")
    g.add_argument("--exit-trim", default=S, help="VocabTrim set for the early-exit head; 'bundled' as for --vocab-trim")
    g.add_argument("--verify-cut", type=int, default=S,
                   help="Mirror-SD: verify the window only up to the first draft token outside the early "
                        "exit's top-N at its position (0: the whole window)")
    g.add_argument("--draft-prefill", default=S, choices=DRAFT_PREFILLS,
                   help="how a network draft prefills the prompt: fp32 (its model's full-precision graph: exact KV, "
                        "faster at prompt widths), draft (its own graph), auto (fp32 where the draft holds those "
                        "weights - the gguf draft on the CPU - and the prompt is long enough; the default)")
    g.add_argument("--rollout-stop", default=S, choices=ROLLOUT_STOPS,
                   help="distributed Mirror-SD: end branch rollouts at the verdict after the draft step under "
                        "way (verdict: the embedded default's), also before a draft step predicted to end after "
                        "it (predict: SpecConfig's default), or answer a greedy hit at once with the tokens "
                        "drafted so far (reply)")
    g.add_argument("--pre-budget", type=int, default=S,
                   help="Mirror-SD with a network draft: hypotheses expanded before the signal, ranked by "
                        "the draft's own distribution (0: signal only)")
    g.add_argument("--fill-window", type=int, default=S,
                   help="distributed Mirror-SD: a hit's rollout still running at the verdict goes on until its "
                        "window holds this many tokens (at most gamma) before it is sent (0: off)")
    g.add_argument("--catch-up", default=S, choices=CATCH_UPS,
                   help="Mirror-SD, greedy, pre-signal rollouts of a combined draft: feed an n-gram window to "
                        "the network whole (the default) or lazily, stopping where the network departs from it "
                        "(measured, not adopted: README \"Mirror-SD's own next window\")")
    o = p.add_argument_group("draft backend: ONNX Runtime (see mirror export-draft)")
    o.add_argument("--draft-backend", default=S, choices=DRAFT_BACKENDS,
                   help="where the draft network runs: torch, or onnx (ONNX Runtime on an execution provider)")
    o.add_argument("--onnx-dir", default=S,
                   help="exported draft folder (default: export on first use into ~/.cache/mirror-sd/onnx)")
    o.add_argument("--onnx-provider", dest="onnx_providers", action="append", default=S, metavar="NAME|JSON",
                   help="execution provider in priority order (repeatable): a name such as "
                        "QNNExecutionProvider, or JSON {\"name\": ..., \"options\": {...}} (default: CPU)")
    o.add_argument("--onnx-strict", action="store_true", default=S,
                   help="fail instead of falling back from the first provider")
    o.add_argument("--onnx-threads", type=int, default=S, help="intra-op threads per draft session (default 1)")
    o.add_argument("--onnx-max-len", type=int, default=S, help="cache positions of an export made on first use")


_SPEC_FLAGS = ("method", "draft", "gamma", "kappa", "exit_layer", "budget", "branch_batch", "confidence",
               "draft_layers", "draft_model", "adapter", "exit_head", "vocab_trim", "streams", "stream_layers",
               "rule", "draft_backend", "onnx_dir", "onnx_providers", "onnx_strict", "onnx_threads", "onnx_max_len",
               "ngram_datastore", "exit_trim", "rollout_stop", "pre_budget", "window_stop", "draft_quant",
               "int8_calib", "combine_min", "verify_cut", "draft_prefill", "catch_up", "fill_window")


# settings the embedded default chose for its own draft (the n-gram + gguf draft), dropped when
# a command line names another draft
_DRAFT_TIED = ("draft_model", "draft_quant", "int8_calib", "combine_min", "pre_budget", "budget", "branch_batch")


def spec_from_args(args, base=None):
    """`base` (default: plain decoding) with every speculative flag that was given applied."""
    import dataclasses

    from .spec_config import SpecConfig

    base = base or SpecConfig(method="ar")
    given = {k: getattr(args, k) for k in _SPEC_FLAGS if hasattr(args, k)}
    reset = {}
    if given.get("draft", base.draft) != base.draft:  # another draft: the base's settings for its own
        fresh = SpecConfig()                          # draft go back to the defaults, unless given
        reset = {k: getattr(fresh, k) for k in _DRAFT_TIED if k not in given}
        if given["draft"] == "ngram" and "budget" in reset:
            reset["budget"] = 48  # n-gram branches are dict probes: every top-kappa candidate, 8 x 6
    if "onnx_providers" in given:
        given["onnx_providers"] = _providers(given["onnx_providers"])
    try:
        return dataclasses.replace(base, **reset, **given)
    except ValueError as e:
        _die(str(e))


def _providers(entries: list[str]) -> list:
    """--onnx-provider values: names, or JSON objects with options."""
    out = []
    for e in entries:
        if e.lstrip().startswith("{"):
            try:
                out.append(json.loads(e))
            except json.JSONDecodeError as err:
                _die(f"--onnx-provider {e!r} is not valid JSON: {err}")
        else:
            out.append(e)
    return out


def deployment_from_args(args):
    """The deployment config (--config, else the embedded default) with CLI overrides."""
    import dataclasses

    from .runtime.config import DeploymentConfig

    try:
        deploy = DeploymentConfig.load(args.config) if getattr(args, "config", None) else DeploymentConfig.local()
        if getattr(args, "model", None):  # another model: the default's artifacts for the bundled one go
            deploy = deploy.with_model(args.model)
        spec = spec_from_args(args, deploy.speculative)
        over = {"speculative": spec}
        # the deployment decides where its draft worker runs the draft: the ONNX flags go there too
        draft = {new: getattr(spec, old) for old, new in (("draft_backend", "backend"), ("onnx_dir", "onnx_dir"),
                                                          ("onnx_providers", "providers"),
                                                          ("onnx_strict", "strict_providers"),
                                                          ("onnx_threads", "threads"),
                                                          ("onnx_max_len", "onnx_max_len")) if hasattr(args, old)}
        if draft:
            over["draft"] = dataclasses.replace(deploy.draft, **draft)
        if getattr(args, "model", None):
            over["model"] = args.model
        if getattr(args, "target_backend", None):
            over["target"] = dataclasses.replace(deploy.target, backend=args.target_backend)
        if getattr(args, "dtype", None) and args.dtype != "fp32":
            over["dtype"] = args.dtype
        return dataclasses.replace(deploy, **over)
    except (ValueError, FileNotFoundError) as e:
        _die(str(e))


def sampling_from_args(args):
    from .sampling import SamplingParams

    try:
        return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                              ignore_eos=args.ignore_eos)
    except ValueError as e:
        _die(str(e))


def load_from_args(args):
    import torch

    from .models import BundledModelMissing, ModelLoadError, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return load_model(args.model, dtype=_dtype(args.dtype))
    except (BundledModelMissing, ModelLoadError, FileNotFoundError) as e:
        _die(str(e))


def prompt_ids(lm, prompt: str, raw: bool, system: str | None) -> list[int]:
    tok = lm.tokenizer
    if raw or not tok.chat_template:
        return tok.encode(prompt)
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tok.encode_chat(msgs)


def _stats_line(method, new_tokens, tok_s, tau, acc, hit, prefill_tokens, prefill_ms, finish, where) -> str:
    spec_stats = ""
    if method != "ar":
        spec_stats = f", tau {tau:.2f}, acceptance {acc:.2f}"
        if method == "mirror":
            spec_stats += f", hit rate {hit:.2f}"
    return (f"[{method} ({where}): {new_tokens} new tokens, {tok_s:.1f} tok/s decode{spec_stats}, "
            f"prefill {prefill_tokens} tokens in {prefill_ms:.0f} ms, finish: {finish}]")


def cmd_generate(args) -> int:
    if not args.prompt or not args.prompt.strip():
        _die("the prompt is empty")
    params = sampling_from_args(args)
    deploy = deployment_from_args(args)
    if args.inprocess:
        return _generate_inprocess(args, params, deploy.speculative, *inprocess_backend(args, deploy))
    return _generate_distributed(args, params, deploy)


def inprocess_backend(args, deploy=None) -> tuple[str, bool]:
    """The target backend for a model run in this process (on the CPU): --target-backend, else the
    deployment's target.backend (default auto), with auto resolved for one fp32 CPU worker; and
    whether auto chose it."""
    import dataclasses

    from .runtime.config import TargetConfig

    target = deploy.target if deploy is not None else TargetConfig()
    backend = getattr(args, "target_backend", None) or target.backend
    dtype = getattr(args, "dtype", None) or "fp32"
    try:
        t = dataclasses.replace(target, backend=backend, device="cpu", num_gpus=0.0, num_workers=1)
        if t.backend == "onnx" and dtype != "fp32":
            raise ValueError("target.backend onnx runs fp32 (dtype: fp32)")
    except ValueError as e:
        _die(str(e))
    return t.resolve_backend(dtype), t.backend == "auto"


def with_target_backend(lm, spec, backend: str, auto: bool = False):
    """`lm` with its target on `backend`: the eager model, or its ONNX Runtime graphs (cut at
    the exit layer for Mirror-SD; PyTorch then runs only the host-side ops, on one thread). A
    backend chosen by auto falls back to the eager model, with a warning, if the graphs fail."""
    if backend != "onnx":
        return lm
    import dataclasses

    import torch

    from .models.ort_target import OrtTarget

    splits = [spec.resolve_exit_layer(lm.model.cfg.n_layers)] if spec is not None and spec.method == "mirror" else []
    try:
        lm = dataclasses.replace(lm, model=OrtTarget(lm.model, splits=splits))
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own error types
        if not auto:
            _die(str(e))
        print(f"[warning: the onnx target backend failed ({e}); the target runs on eager PyTorch]",
              file=sys.stderr)
        return lm
    torch.set_num_threads(1)  # host-side ops only: ONNX Runtime's pool has the cores (host_threads)
    return lm


def _generate_inprocess(args, params, spec, backend: str = "torch", auto: bool = False) -> int:
    """The reference path: target and draft in this process, one after the other."""
    lm = with_target_backend(load_from_args(args), spec, backend, auto)
    backend = getattr(lm.model, "backend", "torch")
    ids = prompt_ids(lm, args.prompt, args.raw, args.system)
    from contextlib import nullcontext

    from . import trace
    from .decoding.factory import generate

    def stream(text, _ids):
        if not args.json:
            sys.stdout.write(text)
            sys.stdout.flush()

    t0 = time.perf_counter()
    try:
        with trace.recording() if args.trace else nullcontext() as rec:
            with trace.span("request", "request", method=spec.method):
                res = generate(lm.model, lm.tokenizer, ids, params, spec, on_chunk=stream)
    except (ValueError, FileNotFoundError) as e:
        _die(str(e))
    except RuntimeError as e:
        from .onnx.providers import ProviderFallbackError

        if not isinstance(e, ProviderFallbackError):
            raise
        _die(str(e))
    wall = time.perf_counter() - t0
    if args.trace:
        _save_trace(rec, args.trace)
    m = res.metrics
    if args.json:
        d = res.to_dict()
        d["wall_s"] = wall
        d["runtime"] = "inprocess"
        print(json.dumps(d))
    else:
        sys.stdout.write("\n")
        where = "in-process" + (", target on ONNX Runtime" if backend == "onnx" else "")
        if "draft_backend" in m.extra:  # an ONNX Runtime draft: say where it ran
            st = m.extra["draft_backend"]
            where += f", draft on {st['provider']}" + (" after fallback" if st["fallback"] else "")
        print(_stats_line(spec.method, m.new_tokens, m.tokens_per_s, m.tau, m.acceptance_rate, m.hit_rate,
                          m.prompt_tokens, m.prefill_s * 1e3, res.finish_reason, where), file=sys.stderr)
    return 0


def _generate_distributed(args, params, deploy) -> int:
    """The main path: the runtime of `deploy` (embedded: a local Ray started in-process, target
    and draft actors on their own cores, the gRPC token channel)."""
    import asyncio

    from .engine import GenerateArgs

    if not args.json:
        print(f"[starting the {deploy.name} runtime: Ray, target and draft workers ...]", file=sys.stderr)
    try:
        from .models import BundledModelMissing, ModelLoadError
        from .runtime.cluster import DistributedEngine

        eng = DistributedEngine(deploy)
    except (BundledModelMissing, ModelLoadError, FileNotFoundError, ValueError) as e:
        _die(str(e))
    import ray

    backend = ray.get(eng.runtime.targets[0].info.remote()).get("backend")
    where = f"{deploy.name} runtime" + (", target on ONNX Runtime" if backend == "onnx" else "")
    spec = deploy.speculative
    tok = eng.tokenizer

    class _LM:
        tokenizer = tok

    ids = prompt_ids(_LM, args.prompt, args.raw, args.system)
    try:
        if len(ids) + params.max_new_tokens + (spec.gamma + 1 if spec.method != "ar" else 0) > eng.context_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                             f"the model's context of {eng.context_len} tokens")
    except ValueError as e:
        _die(str(e))
    text, out_ids, last = [], [], None

    async def run():
        nonlocal last
        async for c in eng.generate(GenerateArgs(ids, params, spec), asyncio.Event()):
            text.append(c.text)
            out_ids.extend(c.token_ids)
            if not args.json and c.text:
                sys.stdout.write(c.text)
                sys.stdout.flush()
            if c.finish_reason is not None:
                last = c

    t0 = time.perf_counter()
    try:
        from . import trace

        origin = eng.runtime.start_trace() if args.trace else None
        if args.trace:
            trace.start(origin)  # the driver's own lane: the request as the user sees it
        with trace.span("request", "request", method=spec.method):  # a no-op unless recording
            asyncio.run(run())
        if args.trace:
            rec = eng.runtime.stop_trace(origin)
            rec.events.extend(trace.stop())
            _save_trace(rec, args.trace)
    finally:
        import ray

        eng.runtime.shutdown()
        ray.shutdown()
    wall = time.perf_counter() - t0
    u = last.usage
    if last.finish_reason == "error":
        _die(f"generation failed: {last.error}", 1)
    degraded = eng.completed[-1].get("degraded") if eng.completed else None
    if degraded:  # the output is still the target's own; only the speed is lost
        print(f"[warning: the draft failed ({degraded}); the target finished alone]", file=sys.stderr)
    if args.json:
        print(json.dumps({"text": "".join(text), "ids": out_ids, "finish_reason": last.finish_reason,
                          "method": last.method, "runtime": "distributed", "wall_s": wall, "degraded": degraded,
                          "usage": None if u is None else {k: getattr(u, k) for k in u.__slots__}}))
    else:
        sys.stdout.write("\n")
        print(_stats_line(last.method, u.completion_tokens, u.tokens_per_s, u.tau, u.acceptance_rate,
                          u.hit_rate, u.prompt_tokens, u.prefill_ms, last.finish_reason, where),
              file=sys.stderr)
    return 0


def cmd_train_draft(args) -> int:
    import torch

    from .training.train_draft import TrainConfig, Trainer

    data = _training_data(args)
    try:
        cfg = TrainConfig(data=data, out=args.out, draft_layers=args.draft_layers, adapter_ffn=args.adapter_ffn,
                          exit_layer=args.exit_layer, prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                          gen_batch=args.gen_batch, vocab_size=args.vocab_size, streams=args.streams,
                          stream_rank=args.stream_rank, exit_rank=args.exit_rank, exit_tokens=args.exit_tokens,
                          epochs=args.epochs, lr=args.lr, seed=args.seed, parts=args.parts)
    except ValueError as e:
        _die(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_from_args(args)
    try:
        report = Trainer(lm.model, lm.tokenizer, cfg).run()
    except ValueError as e:
        _die(str(e))
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return 0


def cmd_build_datastore(args) -> int:
    from .decoding.artifacts import target_fingerprint
    from .training.datastore import build_datastore

    _require_positive(args, "prompts", "max_new_tokens", "batch", "n_max", "min_count")
    if args.skip < 0:
        _die("--skip must be >= 0")
    data = _training_data(args)
    lm = load_from_args(args)
    try:
        store = build_datastore(lm.model, lm.tokenizer, data, args.prompts, args.out,
                                max_new_tokens=args.max_new_tokens, batch=args.batch, seed=args.seed,
                                skip=args.skip, n_max=args.n_max, min_count=args.min_count,
                                meta={"target": target_fingerprint(lm.model)})
    except ValueError as e:
        _die(str(e))
    print(json.dumps({"entries": len(store), **store.meta}))
    return 0


CALIBRATE_STOP_OUT = "artifacts/window_stop.json"


def cmd_calibrate_stop(args) -> int:
    import torch

    from .decoding.drafters.ngram import load_datastore
    from .training.replay import answer_settings, load_answers
    from .training.window_stop import acceptance_counts
    from .decoding.drafters.window_stop import WindowStop

    _require_positive(args, "gamma", "reps")
    if args.gamma > 16:
        _die("--gamma must be <= 16")
    backend = args.target_backend
    if args.update:
        return _calibrate_stop_update(args, backend)
    if not args.answers:
        _die("--answers DIR is required (or --update FILE to re-time only the cost curve)")
    try:
        settings = answer_settings(args.answers)
    except (OSError, ValueError, KeyError) as e:
        _die(f"--answers {args.answers}: not a `mirror build-datastore` folder ({e})")
    store = None
    if args.datastore != "none":
        try:
            store = load_datastore(args.datastore)
        except (OSError, ValueError) as e:
            _die(f"--datastore {args.datastore}: {e}")
        m = store.meta
        if (m.get("source") == settings.get("data") and m.get("seed") == settings.get("seed")
                and settings.get("skip", 0) < m.get("prompts", 0) + m.get("skip", 0)):
            _die(f"--answers {args.answers} starts at prompt {settings.get('skip', 0)}, inside the "
                 f"{m.get('prompts')} prompts the datastore was built from: calibrate on held-out prompts "
                 f"(build-datastore --skip {m.get('prompts', 0) + m.get('skip', 0)} or more)")
    cost = None
    if args.cost:
        try:
            cost = [float(x) for x in args.cost.split(",")]
            WindowStop({}, cost)
        except ValueError as e:
            _die(f"--cost: {e}")
    from .models.loader import load_tokenizer

    tok, _ = load_tokenizer(args.model)
    try:
        pairs = load_answers(args.answers, tok, args.data)
    except (OSError, ValueError) as e:
        _die(str(e))
    counts, rep = acceptance_counts(pairs, store, args.gamma, args.ngram_min, args.ngram_max)
    if cost is None:
        cost = _time_cost(args, backend)
    stop = WindowStop.fit(counts, cost, {"answers_dir": args.answers, "answers": len(pairs),
                                         "answer_settings": settings, "datastore": args.datastore,
                                         "gamma": args.gamma, "replay": rep, "threads": torch.get_num_threads(),
                                         "cost_measured": not args.cost, "cost_backend": backend})
    if not args.cost:
        stop.costs[backend] = list(stop.cost)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    stop.save(args.out)
    print(json.dumps({"out": args.out, "keys": len(stop.accept), "cost": stop.cost, **rep}))
    return 0


def _time_cost(args, backend: str) -> list[float]:
    """The target's step cost for windows of 1..gamma+1 tokens, timed on `backend`."""
    from .training.window_stop import measure_cost

    lm = load_from_args(args)
    if backend == "onnx":
        from .models.ort_target import OrtTarget, host_threads

        import torch

        try:
            model = OrtTarget(lm.model, threads=torch.get_num_threads())
        except (RuntimeError, ValueError) as e:
            _die(str(e))
        with host_threads(1):
            return measure_cost(model, args.gamma + 1, reps=args.reps)
    return measure_cost(lm.model, args.gamma + 1, reps=args.reps)


def _calibrate_stop_update(args, backend: str) -> int:
    """--update FILE: keep FILE's acceptance table, (re)time the cost curve of `backend`'s target."""
    import torch

    from .decoding.drafters.window_stop import WindowStop, load_window_stop

    try:
        stop = load_window_stop(args.update)
    except (OSError, ValueError) as e:
        _die(f"--update {args.update}: {e}")
    if args.cost:
        try:
            cost = WindowStop({}, [float(x) for x in args.cost.split(",")]).cost
        except ValueError as e:
            _die(f"--cost: {e}")
    else:
        cost = _time_cost(args, backend)
    costs = {**stop.costs, backend: cost}
    meta = {**stop.meta, "costs_measured": {**stop.meta.get("costs_measured", {}),
                                            backend: {"threads": torch.get_num_threads(), "measured": not args.cost,
                                                      "date": time.strftime("%Y-%m-%d")}}}
    out = args.out if args.out != CALIBRATE_STOP_OUT else args.update
    if out == "bundled":
        _die("--update bundled needs --out PATH (the shipped file is mirror/data/*.window_stop.json)")
    WindowStop(stop.accept, stop.cost, meta, costs).save(out)
    print(json.dumps({"out": out, "backend": backend, "cost": cost}))
    return 0


def _train_bf16(args) -> bool:
    """--precision auto: bf16 autocast where the CPU has native bf16, fp32 elsewhere."""
    from .training.distill import cpu_has_fast_bf16

    prec = "fp32" if args.fp32 else args.precision
    return cpu_has_fast_bf16() if prec == "auto" else prec == "bf16"


def cmd_calibrate_int8(args) -> int:
    from .training.int8 import calibrate_int8

    _require_positive(args, "prompts", "batch")
    if args.max_new_tokens < 0:
        _die("--max-new-tokens must be >= 0")
    if not 0.0 < args.alpha <= 1.0:
        _die("--alpha must be in (0, 1]")
    data = _training_data(args)
    lm = load_from_args(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    try:
        meta = calibrate_int8(lm.model, lm.tokenizer, data, args.out, prompts=args.prompts,
                              max_new_tokens=args.max_new_tokens, seed=args.seed, alpha=args.alpha, batch=args.batch)
    except (ValueError, KeyError) as e:
        _die(str(e))
    print(json.dumps(meta))
    return 0


def cmd_distill_draft(args) -> int:
    from .training.distill import distill_draft

    _require_positive(args, "prompts", "layers", "batch_tokens", "context", "max_new_tokens")
    if not args.epochs > 0 or not args.lr > 0:
        _die("--epochs and --lr must be positive")
    if args.answers and not os.path.isfile(os.path.join(args.answers, "answers.jsonl")):
        _die(f"--answers {args.answers}: no answers.jsonl there (a `mirror build-datastore --out` folder)")
    data = _training_data(args)
    lm = load_from_args(args)
    try:
        report = distill_draft(lm.model, lm.tokenizer, data, args.out, answers_dir=args.answers,
                               prompts=args.prompts, layers=args.layers, epochs=args.epochs, lr=args.lr,
                               batch_tokens=args.batch_tokens, context=args.context, vocab_trim=args.vocab_trim,
                               bf16=_train_bf16(args), seed=args.seed, max_new_tokens=args.max_new_tokens)
    except (ValueError, FileNotFoundError) as e:
        _die(str(e))
    print(json.dumps(report))
    return 0


QUANT_NOTE = {"int8": ", int8 weights", "gguf": ", the GGUF file's own 4-/8-bit blocks (MatMulNBits)"}


def cmd_export_draft(args) -> int:
    from .spec_config import SpecConfig

    try:
        spec = SpecConfig(method="mirror", draft=args.draft, draft_layers=args.draft_layers,
                          draft_model=args.draft_model, adapter=args.adapter, vocab_trim=args.vocab_trim,
                          streams=args.streams, stream_layers=args.stream_layers, draft_quant=args.draft_quant,
                          int8_calib=args.int8_calib)
    except ValueError as e:
        _die(str(e))
    try:
        from .onnx.export import export_from_spec
    except ImportError as e:
        _die(f"{e}; install the ONNX extra: pip install 'mirror-sd[onnx]'")
    lm = load_from_args(args)
    t0 = time.perf_counter()
    try:
        meta = export_from_spec(lm.model, spec, args.out, kind=args.draft, rows=args.rows,
                                step_width=args.step_width, window_width=args.window_width, max_len=args.max_len,
                                branch_slots=args.branch_slots, opset=args.opset)
    except (ValueError, FileNotFoundError, ImportError) as e:
        _die(str(e))
    if args.json:
        print(json.dumps(meta))
        return 0
    sh = meta["shapes"]
    print(f"exported {args.draft} draft ({meta['draft']['cache_layers']} layers, vocab {sh['vocab']}) to "
          f"{args.out} in {time.perf_counter() - t0:.1f} s")
    print(f"  rows {sh['rows']}, step widths {sh['step_widths']}, max_len {sh['max_len']}, branch slots "
          f"{sh['branch_slots']}, {meta['dtype']}{QUANT_NOTE.get((meta.get('quant') or {}).get('mode'), '')}, opset {meta['opset']}")
    for g in meta["graphs"].values():
        print(f"  {g['file']}")
    w = meta["weights"]
    if w.get("per_graph"):
        print(f"  {', '.join(w['files'].values())} ({w['bytes'] / 1e6:.1f} MB in all: int8 weights, one file per graph)")
    else:
        print(f"  {w['file']} ({w['bytes'] / 1e6:.1f} MB, shared by all graphs)")
    if meta["vocab_trim"]:
        print(f"  {meta['vocab_trim']['file']} ({meta['vocab_trim']['size']} tokens)")
    print("  draft.json (metadata)")
    return 0


def _require_positive(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) <= 0:
            _die(f"--{name.replace('_', '-')} must be positive")


def _training_data(args) -> str:
    """--data, or ../shared/data/train_prompts.jsonl when it is there; a CLI error otherwise."""
    data = args.data or _default_train_data()
    if not data or not os.path.isfile(data):
        _die("no training prompts: pass --data PATH (a JSONL file with a 'prompt' field per line, e.g. "
             "../shared/data/train_prompts.jsonl)")
    return data


def _default_train_data() -> str | None:
    from pathlib import Path

    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        p = base.parent / "shared" / "data" / "train_prompts.jsonl"
        if p.is_file():
            return str(p)
    return None


def _save_trace(rec, path: str) -> None:
    """The request's Chrome trace JSON, and a Gantt PNG of its first steps when matplotlib is there."""
    rec.save(path)
    msg = f"[trace: {path}"
    try:
        from benchmarks.timeline import render_gantt

        png = os.path.splitext(path)[0] + ".png"
        render_gantt(rec.chrome_events(), png)
        msg += f", {png}"
    except ImportError:
        msg += "; no PNG: matplotlib is not installed (pip install 'mirror-sd[bench]')"
    except ValueError as e:
        msg += f"; no PNG: {e}"
    print(msg + "]", file=sys.stderr)


def cmd_bench(args) -> int:
    from benchmarks.bench import cmd_bench as run

    return run(args)


def cmd_serve(args) -> int:
    from .serve import run

    return run(args)


def cmd_client(args) -> int:
    import grpc

    from .client import GenerateClient, GenerateError

    if args.system and args.raw:
        _die("--system needs the chat template; it cannot be combined with --raw")
    params = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, stop=args.stop, stop_token_ids=args.stop_token_id,
                  ignore_eos=args.ignore_eos, method=args.method, raw=args.raw)
    prompt, messages = args.prompt, None
    if args.system:
        prompt, messages = None, [{"role": "system", "content": args.system},
                                  {"role": "user", "content": args.prompt}]
    text, ids, last = [], [], None
    with GenerateClient(args.server, timeout=args.timeout) as client:
        stream = client.stream(prompt, messages=messages, **params)
        try:
            for chunk in stream:
                text.append(chunk.text)
                ids.extend(chunk.token_ids)
                if not args.json:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                if chunk.finish_reason is not None:
                    last = chunk
        except GenerateError as e:
            if e.code == grpc.StatusCode.INVALID_ARGUMENT:
                _die(f"invalid request: {e.message}")
            if e.code == grpc.StatusCode.UNAVAILABLE:
                _die(f"cannot reach a mirror server at {args.server} ({e.message})", 1)
            _die(f"the server failed the request ({e.code.name}): {e.message}", 1)
        except KeyboardInterrupt:
            stream.cancel()
            print("\n[cancelled]", file=sys.stderr)
            return 130
    if last is None:
        _die("the server ended the stream without a final message", 1)
    u = last.usage
    if args.json:
        print(json.dumps({"text": "".join(text), "ids": ids, "finish_reason": last.finish_reason,
                          "method": last.method, "error": last.error,
                          "usage": None if u is None else {f: getattr(u, f) for f in u.__slots__}}))
    else:
        sys.stdout.write("\n")
        if u is not None:
            spec_stats = ""
            if last.method != "ar":
                spec_stats = f", tau {u.tau:.2f}, acceptance {u.acceptance_rate:.2f}"
                if last.method == "mirror":
                    spec_stats += f", hit rate {u.hit_rate:.2f}"
            print(f"[{last.method}: {u.completion_tokens} new tokens, {u.tokens_per_s:.1f} tok/s decode"
                  f"{spec_stats}, prefill {u.prompt_tokens} tokens in {u.prefill_ms:.0f} ms, "
                  f"finish: {last.finish_reason}]", file=sys.stderr)
    if last.finish_reason == "error":
        _die(f"the server failed the request: {last.error}", 1)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mirror", description="Mirror speculative decoding runtime")
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text, streamed to the terminal")
    g.add_argument("prompt")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--system", default=None, help="system message for chat models")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    g.add_argument("--trace", default=None, metavar="PATH",
                   help="write a Chrome/Perfetto trace of the request to PATH (and a timeline PNG)")
    g.add_argument("--config", default=None, metavar="YAML",
                   help="deployment config (default: the embedded local runtime, as deploy/local.yaml)")
    g.add_argument("--inprocess", action="store_true",
                   help="reference path for debugging: target and draft in this process, no Ray/gRPC")
    g.add_argument("--target-backend", default=None, choices=["auto", "torch", "onnx"],
                   help="how the target runs (default: the deployment config's, auto): onnx = its layers "
                        "as ONNX Runtime graphs (fp32, CPU, one worker), torch = eager PyTorch, auto = onnx "
                        "where it applies and ONNX Runtime is installed")
    add_spec_args(g)
    g.set_defaults(func=cmd_generate)

    from .serve import add_serve_args

    s = sub.add_parser("serve", help="serve a model over gRPC (mirror.v1.Generate, health, reflection)")
    add_serve_args(s)
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("client", help="stream a generation from a running `mirror serve`")
    c.add_argument("prompt")
    c.add_argument("--server", default="127.0.0.1:50051", help="host:port of the server")
    c.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=int, default=None,
                   help="default: the server's")
    c.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    c.add_argument("--top-k", type=int, default=0)
    c.add_argument("--top-p", type=float, default=None)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    c.add_argument("--stop-token-id", type=int, action="append", default=[], help="(repeatable)")
    c.add_argument("--ignore-eos", action="store_true")
    c.add_argument("--method", default=None, help="ar | sd | mirror (default: the server's)")
    c.add_argument("--raw", action="store_true", help="do not apply the chat template")
    c.add_argument("--system", default=None, help="system message for chat models")
    c.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    c.add_argument("--timeout", type=float, default=None, help="seconds for the whole request")
    c.set_defaults(func=cmd_client)
    t = sub.add_parser("train-draft", help="distil the draft (adapter, streams, exit head) from the target")
    t.add_argument("--data", default=None, help="training prompts JSONL (default ../shared/data/train_prompts.jsonl)")
    t.add_argument("--out", default="artifacts/draft", help="output folder (resumes if it holds a run)")
    add_model_args(t)
    t.add_argument("--draft-layers", type=int, default=4)
    t.add_argument("--adapter-ffn", type=int, default=1536)
    t.add_argument("--exit-layer", type=int, default=0)
    t.add_argument("--prompts", type=int, default=600, help="training prompts (600: ~27 min on a 2-core AVX2 machine)")
    t.add_argument("--max-new-tokens", type=int, default=128)
    t.add_argument("--gen-batch", type=int, default=16)
    t.add_argument("--vocab-size", type=int, default=8192, help="VocabTrim set size (0 = off)")
    t.add_argument("--streams", type=int, default=2)
    t.add_argument("--stream-rank", type=int, default=0)
    t.add_argument("--exit-rank", type=int, default=64)
    t.add_argument("--exit-tokens", type=int, default=40000)
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--parts", nargs="+", default=["adapter", "streams", "exit_head"])
    t.set_defaults(func=cmd_train_draft)
    d = sub.add_parser("build-datastore", help="the n-gram draft's datastore from the target's answers to training prompts")
    d.add_argument("--data", default=None, help="training prompts JSONL (default ../shared/data/train_prompts.jsonl)")
    d.add_argument("--out", default="artifacts/datastore", help="output folder (answers are cached; resumes)")
    add_model_args(d)
    d.add_argument("--prompts", type=int, default=3000)
    d.add_argument("--skip", type=int, default=0, help="leave out the first prompts of the seeded order")
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--batch", type=int, default=50, help="prompts decoded together")
    d.add_argument("--n-max", type=int, default=4, help="longest n-gram kept")
    d.add_argument("--min-count", type=int, default=2, help="keep an n-gram seen at least this often")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_build_datastore)
    d = sub.add_parser("calibrate-stop", help="the n-gram window stop: acceptance by token kind (replay of held-out "
                       "training answers) and the target's step cost by window length (timed here)")
    d.add_argument("--answers", default=None, metavar="DIR",
                   help="a `mirror build-datastore --skip N` folder of answers to prompts the datastore never saw")
    d.add_argument("--update", default=None, metavar="FILE",
                   help="keep FILE's acceptance table and (re)time only the cost curve of --target-backend's "
                        "target, stored beside the others (written back to FILE unless --out is given)")
    d.add_argument("--target-backend", default="torch", choices=["torch", "onnx"],
                   help="the target whose step cost is timed (a stop file holds one curve per backend; "
                        "decoding uses the one of the target it verifies on)")
    d.add_argument("--data", default=None, help="the training prompts file those answers came from")
    d.add_argument("--datastore", default="bundled", help="the datastore the stop is for ('none': context only)")
    d.add_argument("--out", default=CALIBRATE_STOP_OUT)
    add_model_args(d)
    d.add_argument("--gamma", type=int, default=8, help="longest window calibrated")
    d.add_argument("--ngram-min", type=int, default=2)
    d.add_argument("--ngram-max", type=int, default=4)
    d.add_argument("--cost", default=None, metavar="C1,C2,...",
                   help="step costs for windows of 1, 2, ... tokens instead of timing the target here")
    d.add_argument("--reps", type=int, default=40, help="timing rounds")
    d.set_defaults(func=cmd_calibrate_stop)
    d = sub.add_parser("calibrate-int8", help="SmoothQuant statistics for the int8 draft (an int8 copy of the "
                       "target): activation maxima over training prompts and the target's answers")
    d.add_argument("--data", default=None, help="training prompts JSONL (default ../shared/data/train_prompts.jsonl)")
    d.add_argument("--out", default="artifacts/int8_calib.safetensors")
    add_model_args(d)
    d.add_argument("--prompts", type=int, default=64)
    d.add_argument("--max-new-tokens", type=int, default=64, help="target answer tokens per prompt (0: prompts only)")
    d.add_argument("--batch", type=int, default=16, help="prompts decoded together")
    d.add_argument("--alpha", type=float, default=0.85, help="SmoothQuant migration strength")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_calibrate_int8)
    d = sub.add_parser("distill-draft", help="a separate small draft model distilled from the target's answers")
    d.add_argument("--data", default=None, help="training prompts JSONL (default ../shared/data/train_prompts.jsonl)")
    d.add_argument("--out", default="artifacts/small-draft", help="output folder (checkpointed; resumes)")
    d.add_argument("--answers", default=None, metavar="DIR",
                   help="a `mirror build-datastore` folder whose cached answers to reuse (default: --out)")
    add_model_args(d)
    d.add_argument("--prompts", type=int, default=3000)
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--layers", type=int, default=4, help="draft depth (initialised from the target's first layers)")
    d.add_argument("--epochs", type=float, default=2)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per optimizer step")
    d.add_argument("--context", type=int, default=128, help="prompt tokens kept before each answer")
    d.add_argument("--vocab-trim", default="bundled", help="VocabTrim set of the draft head")
    d.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="training precision; auto: bf16 autocast where the CPU has native bf16 "
                        "(AVX512-BF16 / AMX), fp32 elsewhere (emulated bf16 is ~30x slower)")
    d.add_argument("--fp32", action="store_true", help="same as --precision fp32")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_distill_draft)
    e = sub.add_parser("export-draft", help="export a draft network to ONNX (static shapes) for ONNX Runtime")
    add_model_args(e)
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--draft", default="self", choices=["self", "model", "streaming"])
    e.add_argument("--draft-layers", type=int, default=4, help="self-draft depth k (target layers [0, k))")
    e.add_argument("--draft-model", default=None, help="separate draft model (GGUF or HF folder)")
    e.add_argument("--adapter", default=None, help="trained draft artifact (mirror train-draft)")
    e.add_argument("--vocab-trim", default=None, help="VocabTrim token set (JSON): trimmed head")
    e.add_argument("--streams", type=int, default=0, help="speculative-streaming streams (default 2)")
    e.add_argument("--stream-layers", type=int, default=1)
    e.add_argument("--draft-quant", default="none", choices=["none", "int8", "gguf"],
                   help="int8: export the model draft as dynamic-int8 graphs (e.g. --draft model --draft-model target); "
                        "gguf: as MatMulNBits graphs over the GGUF file's own 4-bit blocks")
    e.add_argument("--int8-calib", default=None,
                   help="SmoothQuant statistics for an int8 draft (mirror calibrate-int8); 'bundled': the default model's")
    e.add_argument("--rows", type=int, default=8, help="hypothesis rows R of the branch graph")
    e.add_argument("--step-width", type=int, default=64, help="tokens T per chunk call (a 1-token graph is added)")
    e.add_argument("--window-width", type=int, default=8,
                   help="tokens T of the window-sized step graph (a draft window + the tokens committed with it)")
    e.add_argument("--max-len", type=int, default=2048, help="KV cache positions")
    e.add_argument("--branch-slots", type=int, default=18, help="own-token slots per hypothesis row (>= gamma + 2)")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    e.add_argument("--json", action="store_true", help="print the metadata as JSON")
    e.set_defaults(func=cmd_export_draft)
    from benchmarks.bench import add_args as add_bench_args

    b = sub.add_parser("bench", help="Spec-Bench speed of ar/sd/mirror (and peers), interleaved per question")
    add_bench_args(b)
    b.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
