"""Exact offline replay of greedy speculative decoding on the target's own greedy answers.

Greedy speculative decoding emits exactly the target's greedy text, so for a draft that does not
depend on the target's numbers (n-gram lookup over the context and a datastore) the accepted
length of every step follows from the answer alone: replay the answer, draft gamma tokens from
the committed context, accept the longest matching prefix, add the correction/bonus token.
`benchmarks/draft_sim.py` uses it to compare drafts, `mirror calibrate-stop` to measure how
often each kind of drafted token is accepted. Only answers to training prompts are replayed,
never Spec-Bench.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..decoding.messages import DraftWindow, Verdict


def replay(drafter, prompt: list[int], answer: list[int], gamma: int,
           observe: Callable[[DraftWindow, list[int], int, int], None] | None = None) -> tuple[int, int]:
    """(steps, tokens) of vanilla SD with this drafter on one greedy answer. `observe(window,
    answer, pos, accepted)` sees every window: it was drafted after answer[:pos]."""
    if not answer:
        return 0, 0
    drafter.start(prompt + answer[:1])  # prefill emits the first token
    pos, steps = 1, 0
    while pos < len(answer):
        w = drafter.propose(gamma)
        a = 0
        while a < len(w.ids) and pos + a < len(answer) and w.ids[a] == answer[pos + a]:
            a += 1
        if observe is not None:
            observe(w, answer, pos, a)
        if pos + a >= len(answer):  # the answer ended inside the window
            pos, steps = len(answer), steps + 1
            break
        drafter.commit(Verdict(steps, a, answer[pos + a]))
        pos += a + 1
        steps += 1
    return steps, len(answer) - 1


def load_answers(folder: str, tokenizer, data: str | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) pairs from a `mirror build-datastore` folder."""
    from .corpus import encode_prompts, load_prompts

    path = Path(folder) / "answers.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no answers in {folder} (make them with `mirror build-datastore --out {folder} "
                                f"--skip N`, N past the datastore's prompts)")
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    s = lines[0]["settings"]
    data = data or str(Path(__file__).resolve().parents[3] / "shared" / "data" / s["data"])
    if not Path(data).is_file():
        raise FileNotFoundError(f"training prompts {data} not found (the file {folder} was made from; pass --data)")
    texts = load_prompts(data, s["skip"] + len(lines) - 1, s["seed"])[s["skip"]:]
    answers = lines[1:]
    prompts = encode_prompts(tokenizer, [texts[r["i"]] for r in answers], s["max_prompt_tokens"])
    return [(p, r["ids"]) for p, r in zip(prompts, answers)]


def answer_settings(folder: str) -> dict:
    """The settings line of a build-datastore folder (data, seed, skip, ...)."""
    with open(Path(folder) / "answers.jsonl") as f:
        return json.loads(f.readline())["settings"]
