"""VocabTrim: restrict a draft's LM head to the target's most frequent tokens.

A token set is a sorted list of target ids; the draft's head keeps only those rows, so a draft
step reads |set| x dim head weights instead of V x dim. Draft outputs are mapped back to
target ids (`keep_ids[i]`), and draft probabilities are zero outside the set, which the lossless
acceptance rules handle like any other draft distribution.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch


class VocabTrim:
    def __init__(self, keep_ids: Iterable[int], vocab_size: int, meta: dict | None = None):
        ids = sorted(set(int(i) for i in keep_ids))
        if not ids:
            raise ValueError("VocabTrim needs at least one token")
        if ids[0] < 0 or ids[-1] >= vocab_size:
            raise ValueError(f"VocabTrim ids must be in [0, {vocab_size})")
        self.keep_ids = torch.tensor(ids, dtype=torch.long)
        self.vocab_size = vocab_size
        self.meta = meta or {}

    def __len__(self) -> int:
        return len(self.keep_ids)

    @classmethod
    def from_counts(cls, counts: Counter, vocab_size: int, size: int, always: Iterable[int] = (),
                    meta: dict | None = None) -> "VocabTrim":
        """The `size` most frequent ids, plus `always` (e.g. end-of-sequence ids)."""
        keep = [t for t, _ in counts.most_common(size)]
        return cls(set(keep) | set(always), vocab_size, meta)

    def coverage(self, counts: Counter) -> float:
        kept = set(self.keep_ids.tolist())
        total = sum(counts.values())
        return sum(c for t, c in counts.items() if t in kept) / total if total else 0.0

    def save(self, path: str) -> None:
        Path(path).write_text(json.dumps({"vocab_size": self.vocab_size, "keep_ids": self.keep_ids.tolist(),
                                          "meta": self.meta}))

    @classmethod
    def load(cls, path: str) -> "VocabTrim":
        d = json.loads(Path(path).read_text())
        return cls(d["keep_ids"], d["vocab_size"], d.get("meta"))
