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


def add_spec_args(p: argparse.ArgumentParser, default_method: str = "ar") -> None:
    from .spec_config import DRAFT_BACKENDS, DRAFTS, METHODS, RULES, SpecConfig

    d = SpecConfig()
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--method", default=default_method, choices=METHODS)
    g.add_argument("--draft", default=d.draft, choices=DRAFTS)
    g.add_argument("--gamma", type=int, default=d.gamma, help="draft window")
    g.add_argument("--kappa", type=int, default=d.kappa, help="early-exit candidates per position")
    g.add_argument("--exit-layer", type=int, default=d.exit_layer, help="l_e (0 = 2N/3)")
    g.add_argument("--budget", type=int, default=d.budget, help="hypotheses expanded per step")
    g.add_argument("--branch-batch", type=int, default=d.branch_batch)
    g.add_argument("--confidence", type=float, default=d.confidence, help="draft early-stop threshold")
    g.add_argument("--draft-layers", type=int, default=d.draft_layers, help="self-draft depth k")
    g.add_argument("--draft-model", default=None, help="separate draft model (GGUF or HF folder)")
    g.add_argument("--adapter", default=None, help="trained draft artifact (mirror train-draft)")
    g.add_argument("--exit-head", default=None, help="trained early-exit head artifact")
    g.add_argument("--vocab-trim", default=None, help="VocabTrim token set (JSON)")
    g.add_argument("--streams", type=int, default=d.streams, help="speculative-streaming lookahead streams")
    g.add_argument("--stream-layers", type=int, default=d.stream_layers)
    g.add_argument("--rule", default=d.rule, choices=RULES, help="acceptance rule at temperature > 0")
    o = p.add_argument_group("draft backend (ONNX Runtime)")
    o.add_argument("--draft-backend", default=d.draft_backend, choices=DRAFT_BACKENDS,
                   help="where the draft network runs (onnx: ONNX Runtime, see mirror export-draft)")
    o.add_argument("--onnx-dir", default=None,
                   help="exported draft folder (default: export on first use into ~/.cache/mirror-sd/onnx)")
    o.add_argument("--onnx-provider", action="append", default=None, metavar="NAME|JSON",
                   help="execution provider in priority order (repeatable): a name such as "
                        "QNNExecutionProvider, or JSON {\"name\": ..., \"options\": {...}} (default: CPU)")
    o.add_argument("--onnx-strict", action="store_true",
                   help="fail instead of falling back from the first provider")
    o.add_argument("--onnx-threads", type=int, default=d.onnx_threads, help="intra-op threads per draft session")
    o.add_argument("--onnx-max-len", type=int, default=d.onnx_max_len,
                   help="cache positions of an export made on first use")


def spec_from_args(args):
    from .spec_config import SpecConfig

    try:
        return SpecConfig(method=args.method, draft=args.draft, gamma=args.gamma, kappa=args.kappa,
                          exit_layer=args.exit_layer, budget=args.budget, branch_batch=args.branch_batch,
                          confidence=args.confidence, draft_layers=args.draft_layers,
                          draft_model=args.draft_model, adapter=args.adapter, exit_head=args.exit_head,
                          vocab_trim=args.vocab_trim, streams=args.streams, stream_layers=args.stream_layers,
                          rule=args.rule, draft_backend=args.draft_backend, onnx_dir=args.onnx_dir,
                          onnx_providers=_providers(args.onnx_provider), onnx_strict=args.onnx_strict,
                          onnx_threads=args.onnx_threads, onnx_max_len=args.onnx_max_len)
    except ValueError as e:
        _die(str(e))


def _providers(entries):
    """--onnx-provider values: names, or JSON objects with options."""
    if not entries:
        return None
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


def cmd_generate(args) -> int:
    if not args.prompt or not args.prompt.strip():
        _die("the prompt is empty")
    params = sampling_from_args(args)
    spec = spec_from_args(args)
    lm = load_from_args(args)
    ids = prompt_ids(lm, args.prompt, args.raw, args.system)
    from .decoding.factory import generate

    def stream(text, _ids):
        if not args.json:
            sys.stdout.write(text)
            sys.stdout.flush()

    t0 = time.perf_counter()
    try:
        res = generate(lm.model, lm.tokenizer, ids, params, spec, on_chunk=stream)
    except (ValueError, FileNotFoundError) as e:
        _die(str(e))
    except RuntimeError as e:
        from .onnx.providers import ProviderFallbackError

        if not isinstance(e, ProviderFallbackError):
            raise
        _die(str(e))
    wall = time.perf_counter() - t0
    m = res.metrics
    if args.json:
        d = res.to_dict()
        d["wall_s"] = wall
        print(json.dumps(d))
    else:
        sys.stdout.write("\n")
        spec_stats = ""
        if spec.method != "ar":
            spec_stats = f", tau {m.tau:.2f}, acceptance {m.acceptance_rate:.2f}"
            if spec.method == "mirror":
                spec_stats += f", hit rate {m.hit_rate:.2f}"
            if "draft_backend" in m.extra:
                st = m.extra["draft_backend"]
                spec_stats += f", draft on {st['provider']}" + (" (fallback)" if st["fallback"] else "")
        print(f"[{spec.method}: {m.new_tokens} new tokens, {m.tokens_per_s:.1f} tok/s decode{spec_stats}, "
              f"prefill {m.prompt_tokens} tokens in {m.prefill_s * 1e3:.0f} ms, "
              f"finish: {res.finish_reason}]", file=sys.stderr)
    return 0


def cmd_export_draft(args) -> int:
    from .spec_config import SpecConfig

    try:
        spec = SpecConfig(method="mirror", draft=args.draft, draft_layers=args.draft_layers,
                          draft_model=args.draft_model, adapter=args.adapter, vocab_trim=args.vocab_trim,
                          streams=args.streams, stream_layers=args.stream_layers)
    except ValueError as e:
        _die(str(e))
    lm = load_from_args(args)
    try:
        from .onnx.export import export_from_spec
    except ImportError as e:
        _die(f"{e}; install the ONNX extra: pip install 'mirror-sd[onnx]'")
    t0 = time.perf_counter()
    try:
        meta = export_from_spec(lm.model, spec, args.out, kind=args.draft, rows=args.rows,
                                step_width=args.step_width, max_len=args.max_len,
                                branch_slots=args.branch_slots, opset=args.opset)
    except (ValueError, FileNotFoundError) as e:
        _die(str(e))
    sh = meta["shapes"]
    if args.json:
        print(json.dumps(meta))
        return 0
    print(f"exported {args.draft} draft ({meta['draft']['cache_layers']} layers, vocab {sh['vocab']}) to "
          f"{args.out} in {time.perf_counter() - t0:.1f} s")
    print(f"  rows {sh['rows']}, step widths {sh['step_widths']}, max_len {sh['max_len']}, branch slots "
          f"{sh['branch_slots']}, {meta['dtype']}, opset {meta['opset']}")
    for name, g in meta["graphs"].items():
        print(f"  {g['file']}")
    print(f"  {meta['weights']['file']} ({meta['weights']['bytes'] / 1e6:.1f} MB, shared by all graphs)")
    if meta["vocab_trim"]:
        print(f"  {meta['vocab_trim']['file']} ({meta['vocab_trim']['size']} tokens)")
    print("  draft.json (metadata)")
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
    add_spec_args(g)
    g.set_defaults(func=cmd_generate)
    e = sub.add_parser("export-draft", help="export a draft network to ONNX (static shapes) for ONNX Runtime")
    add_model_args(e)
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--draft", default="self", choices=["self", "model", "streaming"])
    e.add_argument("--draft-layers", type=int, default=4, help="self-draft depth k (target layers [0, k))")
    e.add_argument("--draft-model", default=None, help="separate draft model (GGUF or HF folder)")
    e.add_argument("--adapter", default=None, help="trained draft artifact (safetensors)")
    e.add_argument("--vocab-trim", default=None, help="VocabTrim token set (JSON): trimmed head")
    e.add_argument("--streams", type=int, default=0, help="speculative-streaming streams (default 2)")
    e.add_argument("--stream-layers", type=int, default=1)
    e.add_argument("--rows", type=int, default=8, help="hypothesis rows R of the branch graph")
    e.add_argument("--step-width", type=int, default=64, help="tokens T per chunk call (a 1-token graph is added)")
    e.add_argument("--max-len", type=int, default=2048, help="KV cache positions")
    e.add_argument("--branch-slots", type=int, default=18, help="own-token slots per hypothesis row (>= gamma)")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    e.add_argument("--json", action="store_true", help="print the metadata as JSON")
    e.set_defaults(func=cmd_export_draft)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
