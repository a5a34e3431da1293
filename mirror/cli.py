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
    lm = load_from_args(args)
    ids = prompt_ids(lm, args.prompt, args.raw, args.system)
    from .decoding.ar import generate_ar

    def stream(text, _ids):
        if not args.json:
            sys.stdout.write(text)
            sys.stdout.flush()

    t0 = time.perf_counter()
    try:
        res = generate_ar(lm.model, lm.tokenizer, ids, params, on_chunk=stream)
    except ValueError as e:
        _die(str(e))
    wall = time.perf_counter() - t0
    m = res.metrics
    if args.json:
        d = res.to_dict()
        d["wall_s"] = wall
        print(json.dumps(d))
    else:
        sys.stdout.write("\n")
        print(f"[{m.new_tokens} new tokens, {m.tokens_per_s:.1f} tok/s decode, "
              f"prefill {m.prompt_tokens} tokens in {m.prefill_s * 1e3:.0f} ms, "
              f"finish: {res.finish_reason}]", file=sys.stderr)
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
    g.set_defaults(func=cmd_generate)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
