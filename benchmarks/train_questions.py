"""Training prompts as a question file in Spec-Bench's format, for choosing settings without
touching Spec-Bench (`mirror bench --questions FILE`). Prompts come from the end of a seeded
shuffle of the training file (the start is what the shipped artifacts were fitted on), at most
`--per-category` of each category and none longer than `--max-chars` (nor shorter than `--min-chars`).

    python -m benchmarks.train_questions --out runs/tune_q.jsonl
    mirror bench --questions runs/tune_q.jsonl --per-category 1 ...
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def train_questions(data: str, n: int, per_category: int, seed: int, tail: int, max_chars: int,
                    min_chars: int = 0) -> list[dict]:
    with open(data) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if rows and "turns" in rows[0] and "prompt" not in rows[0]:
        raise ValueError(f"{data} looks like Spec-Bench (it has 'turns'): use the training prompts")
    random.Random(seed).shuffle(rows)
    seen: dict[str, int] = {}
    out = []
    for r in rows[-tail:]:
        c = r.get("category", "train")
        if seen.get(c, 0) >= per_category or not min_chars <= len(r["prompt"]) <= max_chars:
            continue
        seen[c] = seen.get(c, 0) + 1
        out.append({"question_id": r.get("id", len(out)), "category": c, "turns": [r["prompt"]]})
    return out[:n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "train_prompts.jsonl"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=18)
    ap.add_argument("--per-category", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--tail", type=int, default=2000, help="draw from the last N prompts of the shuffle")
    ap.add_argument("--max-chars", type=int, default=1500)
    ap.add_argument("--min-chars", type=int, default=0, help="only prompts at least this long (long-context settings)")
    args = ap.parse_args(argv)
    if not Path(args.data).is_file():
        ap.error(f"training prompts not found: {args.data} (pass --data)")
    qs = train_questions(args.data, args.n, args.per_category, args.seed, args.tail, args.max_chars, args.min_chars)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for q in qs:
            f.write(json.dumps(q) + "\n")
    print(f"wrote {len(qs)} questions to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
