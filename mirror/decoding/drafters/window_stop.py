"""Window stop: cut an n-gram window where one more drafted token is expected to return less
than it costs the target to verify.

A verification pass over T window tokens is not free on a CPU: on the CI machine (2 threads,
fp32, SmolLM2-135M) a 6-token window costs ~1.13x a plain decoding step and a 9-token one
~1.22x (a 2-token window costs little more than one: a single row is padded to two anyway).
Most n-gram windows are mostly rejected (acceptance ~0.22 at gamma 5): their tail tokens come
from low-order datastore lookups that rarely match. So each drafted token carries a *key* that
says where it came from (context match of length n at offset k, agreeing or not with the
datastore; or datastore lookup on a suffix of length n at window offset k), a calibration table
gives P(accepted | all before accepted, key), and the window is cut at the length g that
maximises expected tokens per unit of target time:

    (1 + sum_{k<=g} prod_{i<=k} p_i) / cost(g + 1)

The table is measured by replaying the target's greedy answers to *held-out training prompts*
(`mirror calibrate-stop`, never Spec-Bench); the cost curve is the target step time against
window length, measured on the machine. Output stays exactly the target's (a window's length
never changes what greedy verification emits), only speed changes.
"""
from __future__ import annotations

import json
from pathlib import Path


def context_key(n: int, k: int, agrees: bool) -> str:
    """A token continuing a context match of length n, k tokens after the match (capped at 3);
    `agrees`: the datastore predicts the same token there."""
    return f"c{n}.{min(k, 3)}.{int(agrees)}"


def datastore_key(n: int, k: int) -> str:
    """A datastore token predicted from a known suffix of length n, at window offset k (capped at 4)."""
    return f"d{n}.{min(k, 4)}"


def _relative(cost: list[float]) -> list[float]:
    if not cost or cost[0] <= 0 or any(c <= 0 for c in cost):
        raise ValueError("window stop: cost must list positive step costs for windows of 1, 2, ... tokens")
    return [c / cost[0] for c in cost]  # relative to a one-token step


class WindowStop:
    """`cost` is the target's step-cost curve; `costs` optionally holds one per target backend
    ("torch", "onnx": their kernels scale differently with the window), `for_backend` picks it."""

    def __init__(self, accept: dict[str, float], cost: list[float], meta: dict | None = None,
                 costs: dict[str, list[float]] | None = None):
        if any(not 0.0 <= p <= 1.0 for p in accept.values()):
            raise ValueError("window stop: acceptance probabilities must lie in [0, 1]")
        self.accept = dict(accept)
        self.cost = _relative(cost)
        self.costs = {str(b): _relative(c) for b, c in (costs or {}).items()}
        self.meta = meta or {}
        self._by_backend: dict[str, WindowStop] = {}

    def for_backend(self, backend: str) -> "WindowStop":
        """This stop with the cost curve timed on `backend`'s target, if it has one."""
        c = self.costs.get(backend)
        if c is None or c == self.cost:
            return self
        if backend not in self._by_backend:
            self._by_backend[backend] = WindowStop(self.accept, c, self.meta, self.costs)
        return self._by_backend[backend]

    def step_cost(self, T: int) -> float:
        """Relative target step time for T window tokens (root + T-1 drafted), extrapolated
        linearly past the measured curve."""
        c = self.cost
        if T <= len(c):
            return c[T - 1]
        slope = (c[-1] - c[-2]) if len(c) >= 2 else 0.0
        return c[-1] + max(slope, 0.0) * (T - len(c))

    def p(self, key: str) -> float:
        v = self.accept.get(key)
        if v is None:  # unseen in calibration: the pooled rate of its source
            v = self.accept.get(key[0] + "*", 0.0)
        return v

    def expected(self, keys: list[str]) -> float:
        """Expected number of these drafted tokens the target accepts: sum_k prod_{i<=k} p_i."""
        survive, total = 1.0, 0.0
        for key in keys:
            survive *= self.p(key)
            total += survive
        return total

    def length(self, keys: list[str]) -> int:
        """How many of the drafted tokens (whose keys these are) to send."""
        best_g, best, survive, expected = 0, 1.0 / self.step_cost(1), 1.0, 0.0
        for g, key in enumerate(keys, 1):
            survive *= self.p(key)
            expected += survive
            v = (1.0 + expected) / self.step_cost(g + 1)
            if v > best:
                best_g, best = g, v
        return best_g

    @classmethod
    def fit(cls, counts: dict[str, list[int]], cost: list[float], meta: dict | None = None) -> "WindowStop":
        """From replay counts key -> [reached, accepted] (Laplace-smoothed), plus pooled rates
        per source ('c*', 'd*') for keys the calibration never saw."""
        accept, pooled = {}, {}
        for key, (reached, acc) in counts.items():
            accept[key] = (acc + 1) / (reached + 2)
            s = pooled.setdefault(key[0] + "*", [0, 0])
            s[0] += reached
            s[1] += acc
        for key, (reached, acc) in pooled.items():
            accept[key] = (acc + 1) / (reached + 2)
        return cls(accept, cost, {**(meta or {}), "counts": {k: list(v) for k, v in sorted(counts.items())}})

    def save(self, path: str) -> None:
        d = {"accept": self.accept, "cost": self.cost, "meta": self.meta}
        if self.costs:
            d["costs"] = self.costs
        Path(path).write_text(json.dumps(d, indent=1))

    @classmethod
    def load(cls, path: str) -> "WindowStop":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"window stop file not found: {path}")
        d = json.loads(p.read_text())
        try:
            return cls(d["accept"], d["cost"], d.get("meta"), d.get("costs"))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a window stop file (made by `mirror calibrate-stop`): {e}") from e


_STOPS: dict[str, WindowStop] = {}


def load_window_stop(path: str) -> WindowStop:
    """A `mirror calibrate-stop` file; "bundled" is the one shipped for the bundled model."""
    from ...models.bundled import resolve_artifact

    path = resolve_artifact(path, "window_stop")
    if path not in _STOPS:
        _STOPS[path] = WindowStop.load(path)
    return _STOPS[path]
