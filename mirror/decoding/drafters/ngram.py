"""Training-free drafts by suffix lookup over the prompt and the output so far (SSSD-style),
optionally backed by a datastore of the target's own text.

The longest suffix of the context (ngram_max down to ngram_min tokens) that occurred before is
looked up in an index of n-gram -> latest end position; the tokens that followed it are the
draft. Where the context has no match, or (mode "fill", the default) its continuation is shorter
than the window, a datastore n-gram model (most frequent continuation of the longest known
suffix, token by token) proposes the rest. Mode "mixed" picks, token by token, whichever source
knows the longer suffix (`benchmarks/draft_sim.py` compares them on held-out training answers).
Deterministic proposals (one-hot), so they are lossless under every acceptance rule. Mirror-SD
branches are lookups too: each hypothesis context costs a few dict probes.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from ...sampling import SamplingParams
from ..messages import DraftWindow, EarlyExitSignal, Verdict
from .base import Drafter, rank_hypotheses
from .window_stop import WindowStop, context_key, datastore_key


class NgramIndex:
    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self.tokens: list[int] = []
        self.table: dict[tuple[int, ...], int] = {}  # n-gram -> index right after its latest occurrence

    def extend(self, ids: list[int]) -> None:
        for t in ids:
            self.tokens.append(t)
            end = len(self.tokens)
            # index the n-grams ending *before* the newest token, so a hit always has a
            # continuation; the newest suffix gets indexed when the next token arrives
            for n in range(self.n_min, self.n_max + 1):
                if end - 1 - n >= 0:
                    self.table[tuple(self.tokens[end - 1 - n:end - 1])] = end - 1

    def next_token(self, seq: list[int]) -> tuple[int | None, int]:
        """(token after the latest occurrence of the longest indexed suffix of seq, its length)."""
        for n in range(min(self.n_max, len(seq)), self.n_min - 1, -1):
            at = self.table.get(tuple(seq[-n:]))
            if at is not None:
                return self.tokens[at], n
        return None, 0

    def lookup(self, ctx_tail: list[int], gamma: int) -> list[int]:
        """Continuation of the longest matching suffix of ctx_tail."""
        return self.match(ctx_tail, gamma)[0]

    def match(self, ctx_tail: list[int], gamma: int) -> tuple[list[int], int]:
        """(continuation of the longest matching suffix of ctx_tail, that suffix's length)."""
        seq = ctx_tail
        for n in range(min(self.n_max, len(seq)), self.n_min - 1, -1):
            at = self.table.get(tuple(seq[-n:]))
            if at is not None:
                return self.tokens[at:at + gamma], n
        return [], 0


class NgramModel:
    """A static datastore: for each n-gram (n_min..n_max) of a corpus, its most frequent next
    token. Built from the target's own generations on training prompts (`mirror train-draft`),
    never from the benchmark."""

    def __init__(self, table: dict[tuple[int, ...], int], n_min: int, n_max: int, meta: dict | None = None):
        self.table, self.n_min, self.n_max, self.meta = table, n_min, n_max, meta or {}

    @classmethod
    def build(cls, sequences, n_min: int = 2, n_max: int = 5, min_count: int = 2,
              meta: dict | None = None) -> "NgramModel":
        counts: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        for seq in sequences:
            seq = list(seq)
            for i in range(1, len(seq)):
                for n in range(n_min, n_max + 1):
                    if i - n >= 0:
                        counts[tuple(seq[i - n:i])][seq[i]] += 1
        table = {}
        for k, c in counts.items():
            tok, cnt = c.most_common(1)[0]
            if cnt >= min_count:
                table[k] = tok
        return cls(table, n_min, n_max, meta)

    def __len__(self) -> int:
        return len(self.table)

    def next_token(self, seq: list[int]) -> tuple[int | None, int]:
        """(most frequent token after the longest known suffix of seq, that suffix's length)."""
        for n in range(min(self.n_max, len(seq)), self.n_min - 1, -1):
            nxt = self.table.get(tuple(seq[-n:]))
            if nxt is not None:
                return nxt, n
        return None, 0

    def draft(self, tail: list[int], gamma: int) -> list[int]:
        return self.draft_n(tail, gamma)[0]

    def draft_n(self, tail: list[int], gamma: int) -> tuple[list[int], list[int]]:
        """Up to gamma tokens after tail, and for each the length of the suffix it was known by."""
        seq = list(tail[-self.n_max:])
        out: list[int] = []
        ns: list[int] = []
        for _ in range(gamma):
            nxt, n = self.next_token(seq)
            if nxt is None:
                break
            out.append(nxt)
            ns.append(n)
            seq = (seq + [nxt])[-self.n_max:]
        return out, ns

    def save(self, path: str) -> None:
        Path(path).write_text(json.dumps({"n_min": self.n_min, "n_max": self.n_max, "meta": self.meta,
                                          "entries": [[list(k), v] for k, v in self.table.items()]}))

    @classmethod
    def load(cls, path: str) -> "NgramModel":
        d = json.loads(Path(path).read_text())
        return cls({tuple(k): v for k, v in d["entries"]}, d["n_min"], d["n_max"], d.get("meta"))


_DATASTORES: dict[str, NgramModel] = {}


def load_datastore(path: str) -> NgramModel:
    """A datastore file; "bundled" is the one shipped for the bundled default model (made by
    `mirror train-draft` from training prompts, see README)."""
    from ...models.bundled import resolve_artifact

    path = resolve_artifact(path, "datastore")
    if path not in _DATASTORES:
        _DATASTORES[path] = NgramModel.load(path)
    return _DATASTORES[path]


class NgramDrafter(Drafter):
    name = "ngram"

    MODES = ("fallback", "fill", "mixed")

    def __init__(self, params: SamplingParams, n_min: int = 2, n_max: int = 4,
                 datastore: NgramModel | None = None, mode: str = "fill", stop: WindowStop | None = None,
                 keyed: bool = False, score: WindowStop | None = None):
        super().__init__(params)
        if mode not in self.MODES:
            raise ValueError(f"unknown n-gram mode {mode!r}; choose from {', '.join(self.MODES)}")
        if (stop is not None or keyed or score is not None) and mode == "mixed":
            raise ValueError("the window stop is calibrated for n-gram modes fill and fallback, not mixed")
        self.n_min, self.n_max, self.mode = n_min, n_max, mode
        # stop: cut windows where more tokens cost more than they return (window_stop.py);
        # keyed: record every drafted token's key in last_keys (calibration replays);
        # score: a table (else the stop's) whose acceptance by key sets each window's `expected`
        self.stop, self.keyed = stop, keyed or stop is not None or score is not None
        self.score = score or stop
        self.last_keys: list[str] = []
        self.index = NgramIndex(n_min, n_max)
        self.datastore = datastore
        self._branches: dict[tuple[int, int], DraftWindow] = {}
        self._pending: list[int] = []

    def start(self, ctx: list[int]) -> None:
        super().start(ctx)
        self.index = NgramIndex(self.n_min, self.n_max)
        self.index.extend(ctx)
        self._branches = {}
        self._pending = []

    def _sync(self) -> None:
        """Index the committed tokens. Deferred from commit to the next lookup, so on a Mirror hit
        it runs in expand (under the target's suffix), not between the verdict and the window."""
        if self._pending:
            self.index.extend(self._pending)
            self._pending = []

    def _draft_after(self, tail: list[int], gamma: int) -> DraftWindow:
        ds = self.datastore
        expected = None
        if self.mode == "mixed":
            ids = self._draft_mixed(tail, gamma)
        else:
            ids, n = self.index.match(tail, gamma)
            keys = self._context_keys(tail, ids, n) if self.keyed else None
            if ds is not None and (not ids or (self.mode == "fill" and len(ids) < gamma)):
                more, ns = ds.draft_n(list(tail) + ids, gamma - len(ids))
                if keys is not None:
                    keys += [datastore_key(m, len(ids) + i) for i, m in enumerate(ns)]
                ids = ids + more
            if keys is not None:
                if self.stop is not None:
                    g = self.stop.length(keys)
                    ids, keys = ids[:g], keys[:g]
                self.last_keys = keys
                if self.score is not None:
                    expected = self.score.expected(keys)
        self.stats.computed += len(ids)
        return DraftWindow(list(ids), None, self.name, expected)

    def _context_keys(self, tail: list[int], ids: list[int], n: int) -> list[str]:
        ds = self.datastore
        seq, keys = list(tail), []
        for k, t in enumerate(ids):
            agrees = ds is not None and ds.next_token(seq[-ds.n_max:])[0] == t
            keys.append(context_key(n, k, agrees))
            seq.append(t)
        return keys

    def _draft_mixed(self, tail: list[int], gamma: int) -> list[int]:
        """Token by token, the longest known suffix over both sources (the context wins ties)."""
        seq, out, ds = list(tail), [], self.datastore
        for _ in range(gamma):
            tok, n = self.index.next_token(seq)
            if ds is not None:
                dtok, dn = ds.next_token(seq)
                if dn > n:
                    tok = dtok
            if tok is None:
                break
            out.append(tok)
            seq.append(tok)
        return out

    def _tail_len(self) -> int:
        return max(self.n_max, self.datastore.n_max if self.datastore is not None else 0)

    def propose(self, gamma: int) -> DraftWindow:
        self._sync()
        self._branches = {}
        self.window = self._draft_after(self.ctx[-self._tail_len():], gamma)
        self.stats.used += len(self.window.ids)
        return self.window

    def commit(self, verdict: Verdict) -> None:
        new = self.window.ids[:verdict.accepted] + [verdict.token]
        super().commit(verdict)
        self._pending.extend(new)
        self._branches = {}

    def expand(self, signal: EarlyExitSignal, gamma: int, budget: int, should_stop=None, batch: int = 8) -> int:
        """Branches for the signal's `budget` most likely hypotheses (kept: any made for this
        window already, e.g. by `branch` before the signal)."""
        hyps = [h for h in rank_hypotheses(signal, self.window, budget) if (h.j, h.token) not in self._branches]
        for h in hyps:
            self.branch(h.j, h.token, gamma)
        self.stats.branches += len(hyps)
        return len(hyps)

    def branch(self, j: int, token: int, gamma: int) -> DraftWindow:
        """The window after hypothesis (j, v): accept d_1..d_j, then the target emits v."""
        self._sync()
        L = self._tail_len()
        ctx = (self.ctx[-L:] + self.window.ids[:j] + [token])[-L:]
        w = self._branches[(j, token)] = self._draft_after(ctx, gamma)
        return w

    def ready(self) -> dict[tuple[int, int], DraftWindow]:
        return dict(self._branches)

    def peek(self, verdict: Verdict) -> DraftWindow | None:
        return self._branches.get((verdict.accepted, verdict.token))

    def take(self, verdict: Verdict, sent: DraftWindow | None = None) -> DraftWindow | None:
        w = self._branches.get((verdict.accepted, verdict.token))
        self._branches = {}
        if sent is not None and (w is None or w.ids != sent.ids):
            raise ValueError(f"the n-gram window sent for {(verdict.accepted, verdict.token)} is not its branch")
        if w is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.commit(verdict)
        self.window = w
        self.stats.used += len(w.ids)
        return w
