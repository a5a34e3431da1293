"""Plain autoregressive decoding: the baseline every speedup is measured against.

One target forward per token over the KV cache; the prompt is prefilled once; the next input
is the sampled id tensor itself (no re-tokenising, no rebuilt sequences). One host sync per
token, for the stop checks.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..models.llama import Transformer
from ..output import OutputStream
from ..sampling import SamplingParams, next_token
from ..tokenizer import Tokenizer
from .result import GenerationResult, Metrics


def check_context(model: Transformer, prompt_len: int, max_new_tokens: int, margin: int = 0) -> None:
    limit = model.cfg.max_seq_len
    if prompt_len == 0:
        raise ValueError("the prompt is empty")
    if prompt_len + max_new_tokens + margin > limit:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's context of {limit} tokens")


@torch.inference_mode()
def prefill(model: Transformer, cache, prompt_ids: list[int], row: int = 0,
            chunk: int = 512) -> torch.Tensor:
    """Write the prompt's KV into `row` of `cache`; returns the last position's logits [V]."""
    ids = torch.tensor([prompt_ids], device=model.device)
    n = len(prompt_ids)
    logits = None
    for s in range(0, n, chunk):  # chunked to bound the attention score tensor
        e = min(n, s + chunk)
        pos = torch.arange(s, e, device=model.device)[None]
        logits = model(ids[:, s:e], pos, cache, rows=range(row, row + 1), kv_len=e, last_only=True)
    cache.set_length(row, n)
    return logits[0, -1]


@torch.inference_mode()
def generate_ar(model: Transformer, tokenizer: Tokenizer, prompt_ids: list[int],
                params: SamplingParams, on_chunk: Callable[[str, list[int]], None] | None = None,
                cache=None, should_stop: Callable[[], bool] | None = None) -> GenerationResult:
    check_context(model, len(prompt_ids), params.max_new_tokens)
    n = len(prompt_ids)
    if cache is None:
        cache = model.new_cache(1, max_len=n + params.max_new_tokens + 1)
    gen = params.generator(model.device)
    out = OutputStream(tokenizer, params, on_chunk)
    m = Metrics(prompt_tokens=n)
    t0 = time.perf_counter()
    logits = prefill(model, cache, prompt_ids)
    tok = next_token(logits, params, gen).view(1, 1)  # [1, 1]
    t1 = time.perf_counter()
    m.prefill_s = t1 - t0
    positions = torch.arange(cache.max_len, device=model.device)[None]  # sliced per step, never rebuilt
    while True:
        if out.push([int(tok)]):  # the one host sync per token
            break
        if should_stop is not None and should_stop():
            out.finish("cancelled")
            break
        logits = model(tok, positions[:, n:n + 1], cache, kv_len=n + 1)
        n += 1
        cache.set_length(0, n)
        m.target_steps += 1
        tok = next_token(logits[0, -1], params, gen).view(1, 1)
    m.decode_s = time.perf_counter() - t1
    m.new_tokens = len(out.ids)
    return GenerationResult(out.ids, out.text, out.finish_reason, m, method="ar")
