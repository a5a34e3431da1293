"""`mirror build-datastore`: the n-gram draft's datastore from the target's own greedy answers to
training prompts (never Spec-Bench).

Generation is batched (one weight read per step for a whole batch), checkpointed after every
batch to `answers.jsonl` in the output folder, and resumes where it stopped. The datastore is
rebuilt from all answers at the end, so a longer run only adds text.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm

from ..decoding.drafters.ngram import NgramModel
from .corpus import encode_prompts, generate_with_features, load_prompts


def target_answers(model, tok, data: str, prompts: int, out: str, max_new_tokens: int = 128, batch: int = 32,
                   seed: int = 0, skip: int = 0, max_prompt_tokens: int = 256, log=print) -> list[list[int]]:
    """Greedy answers (token ids) to `prompts` training prompts, cached in `out/answers.jsonl`.
    `skip` leaves out the first prompts of the seeded order (e.g. a held-out set)."""
    pairs = target_pairs(model, tok, data, prompts, out, max_new_tokens, batch, seed, skip, max_prompt_tokens, log)
    return [a for _, a in pairs]


def target_pairs(model, tok, data: str, prompts: int, out: str, max_new_tokens: int = 128, batch: int = 32,
                 seed: int = 0, skip: int = 0, max_prompt_tokens: int = 256,
                 log=print) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy answer ids) per training prompt: `target_answers` with the encoded
    prompts it decoded from."""
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    cache = outp / "answers.jsonl"
    settings = {"data": os.path.basename(data), "seed": seed, "skip": skip, "max_new_tokens": max_new_tokens,
                "max_prompt_tokens": max_prompt_tokens}
    done: dict[int, list[int]] = {}
    if cache.is_file():
        with cache.open() as f:
            lines = [json.loads(line) for line in f if line.strip()]
        if lines and lines[0].get("settings") != settings:
            raise ValueError(f"{cache} was made with other settings ({lines[0].get('settings')}); use another --out")
        done = {r["i"]: r["ids"] for r in lines[1:]}
    texts = load_prompts(data, skip + prompts, seed)[skip:]
    eos = set(tok.eos_ids)
    enc = encode_prompts(tok, texts, max_prompt_tokens)
    todo = sorted((i for i in range(len(enc)) if i not in done), key=lambda i: len(enc[i]))
    if todo:
        log(f"[build-datastore] {len(done)} answers cached, generating {len(todo)}")
    with cache.open("a") as f:
        if not done and f.tell() == 0:
            f.write(json.dumps({"settings": settings}) + "\n")
        for b0 in tqdm(range(0, len(todo), batch), desc="target answers", unit="batch"):
            idx = todo[b0:b0 + batch]
            feats = generate_with_features(model, [enc[i] for i in idx], max_new_tokens, eos, [], top_k=1)
            for i, ft in zip(idx, feats):
                done[i] = ft.ids[ft.n_prompt:].tolist()
                f.write(json.dumps({"i": i, "ids": done[i]}) + "\n")
            f.flush()
    return [(enc[i], done[i]) for i in range(len(enc))]


def build_datastore(model, tok, data: str, prompts: int, out: str, *, max_new_tokens: int = 128, batch: int = 32,
                    seed: int = 0, skip: int = 0, n_min: int = 1, n_max: int = 4, min_count: int = 2,
                    meta: dict | None = None, log=print) -> NgramModel:
    answers = target_answers(model, tok, data, prompts, out, max_new_tokens, batch, seed, skip, log=log)
    store = NgramModel.build(answers, n_min=n_min, n_max=n_max, min_count=min_count,
                             meta={"source": os.path.basename(data), "seed": seed, "prompts": prompts,
                                   "answer_tokens": sum(map(len, answers)), **(meta or {})})
    store.save(str(Path(out) / "datastore.json"))
    log(f"[build-datastore] {len(answers)} answers, {store.meta['answer_tokens']} tokens -> "
        f"{len(store)} entries in {Path(out) / 'datastore.json'}")
    return store
