"""Spec-Bench questions: loading, categories and selection.

Spec-Bench has 480 questions in 6 categories; its MT-Bench part keeps MT-Bench's own eight
categories in the file (writing, roleplay, ...), which Spec-Bench reports together as mt_bench.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

MT_BENCH = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
CATEGORIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
WHERE = ("Spec-Bench's question.jsonl: https://github.com/hemingkx/Spec-Bench "
         "(data/spec_bench/question.jsonl); pass its path with --questions")


def default_questions_path() -> str | None:
    """`../shared/specbench/question.jsonl` next to the checkout, when it is there."""
    env = os.environ.get("MIRROR_SPECBENCH")
    if env:
        return env
    here = Path(__file__).resolve().parents[1]
    for base in (Path.cwd(), here):
        p = base.parent / "shared" / "specbench" / "question.jsonl"
        if p.is_file():
            return str(p)
    return None


def category(q: dict) -> str:
    c = q["category"]
    return "mt_bench" if c in MT_BENCH else c


def load_questions(path: str | None = None) -> list[dict]:
    path = path or default_questions_path()
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"no Spec-Bench question file at {path!r}; get {WHERE}")
    with open(path) as f:
        qs = [json.loads(line) for line in f if line.strip()]
    for q in qs:
        if "turns" not in q or "category" not in q:
            raise ValueError(f"{path}: each line needs 'turns' and 'category' (Spec-Bench format)")
    return qs


def select(questions: list[dict], per_category: int | None) -> list[dict]:
    """The first `per_category` questions of each category, in file order (all when None)."""
    if per_category is None:
        return list(questions)
    seen: dict[str, int] = defaultdict(int)
    out = []
    for q in questions:
        c = category(q)
        if seen[c] < per_category:
            seen[c] += 1
            out.append(q)
    return out
