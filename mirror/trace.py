"""A tiny tracer for timelines: spans and instant events, written as Chrome/Perfetto trace JSON.

Off by default; while off, `span()` returns one shared no-op context manager and `@traced`
adds one function call and one attribute test, so the calls can stay in hot paths.

    from mirror import trace
    with trace.span("channel.send_signal", "channel", step=3):
        ...
    @trace.traced("target.prefix", "target", args=lambda self, *a, **k: {"step": self.step})
    def prefix(self, ...): ...

    with trace.recording() as rec:      # enable, run one request, collect
        generate(...)
    rec.save("trace.json")              # open in ui.perfetto.dev or chrome://tracing

Events carry the real pid and tid. Categories name the logical side of the rendezvous:
"target", "draft", "channel" (messages between them) and "request". When both sides run in
one thread (the in-process runtime), `save()` gives each (pid, tid, category) its own named
track so the two pipelines show as separate lanes; the real tid stays in each event's args.
A distributed runtime records in each process and merges the event lists (timestamps come
from the system-wide monotonic clock, so one machine's processes line up).
"""
from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

__all__ = ["Recorder", "enabled", "instant", "merge", "recording", "span", "start", "stop", "traced"]


class _NoSpan:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_SPAN = _NoSpan()


class Recorder:
    """Collects events while it is the active recorder. Thread-safe."""

    def __init__(self, origin_ns: int | None = None):
        """`origin_ns`: time zero (perf_counter_ns); pass one origin to the recorders of several
        processes on a machine so their events line up when merged."""
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self.origin_ns = time.perf_counter_ns() if origin_ns is None else origin_ns

    def _ts(self, ns: int) -> float:
        return (ns - self.origin_ns) / 1e3  # Chrome trace timestamps are microseconds

    def add(self, event: dict) -> None:
        with self._lock:
            self.events.append(event)

    def complete(self, name: str, cat: str, start_ns: int, end_ns: int, args: dict | None) -> None:
        self.add({"name": name, "cat": cat, "ph": "X", "pid": os.getpid(), "tid": threading.get_ident(),
                  "ts": self._ts(start_ns), "dur": (end_ns - start_ns) / 1e3, "args": args or {}})

    def instant(self, name: str, cat: str, args: dict | None) -> None:
        self.add({"name": name, "cat": cat, "ph": "i", "s": "t", "pid": os.getpid(),
                  "tid": threading.get_ident(), "ts": self._ts(time.perf_counter_ns()), "args": args or {}})

    def chrome_events(self, lanes_by_category: bool = True) -> list[dict]:
        """The events as a Chrome trace list, plus process/thread name metadata."""
        with self._lock:
            events = [dict(e) for e in self.events]
        if not lanes_by_category:
            return events
        lanes: dict[tuple, int] = {}
        threads: dict[tuple, int] = {}  # (pid, os tid) -> 0, 1, ... for short lane names
        out = []
        for e in events:
            key = (e["pid"], e["tid"], e.get("cat", ""))
            if key not in lanes:
                lanes[key] = len(lanes) + 1
                n = threads.setdefault(key[:2], sum(1 for k in threads if k[0] == key[0]))
                out.append({"name": "thread_name", "ph": "M", "pid": e["pid"], "tid": lanes[key], "ts": 0,
                            "args": {"name": f"{key[2] or 'other'} (pid {key[0]}, thread {n})"}})
                out.append({"name": "thread_sort_index", "ph": "M", "pid": e["pid"], "tid": lanes[key],
                            "ts": 0, "args": {"sort_index": lanes[key]}})
            e["args"] = {**e.get("args", {}), "os_tid": e["tid"]}
            e["tid"] = lanes[key]
            out.append(e)
        return out

    def save(self, path: str, lanes_by_category: bool = True) -> str:
        with open(path, "w") as f:
            json.dump({"traceEvents": self.chrome_events(lanes_by_category), "displayTimeUnit": "ms"}, f)
        return path


class _Span:
    __slots__ = ("rec", "name", "cat", "args", "t0")

    def __init__(self, rec: Recorder, name: str, cat: str, args: dict):
        self.rec, self.name, self.cat, self.args = rec, name, cat, args

    def __enter__(self):
        self.t0 = time.perf_counter_ns()
        return self

    def __exit__(self, *exc):
        self.rec.complete(self.name, self.cat, self.t0, time.perf_counter_ns(), self.args)
        return False


_active: Recorder | None = None


def enabled() -> bool:
    return _active is not None


def span(name: str, cat: str = "", **args):
    """Context manager timing a span; a shared no-op while no recorder is active."""
    rec = _active
    if rec is None:
        return _NO_SPAN
    return _Span(rec, name, cat, args)


def instant(name: str, cat: str = "", **args) -> None:
    rec = _active
    if rec is not None:
        rec.instant(name, cat, args)


def traced(name: str, cat: str = "", args: Callable[..., dict] | None = None):
    """Decorator form of `span`; `args(*call_args, **call_kwargs)` -> dict is evaluated only
    while recording, before the call."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*a, **kw):
            rec = _active
            if rec is None:
                return fn(*a, **kw)
            try:  # before the call: it may change state. Tracing never changes what runs.
                info = args(*a, **kw) if args else None
            except Exception as e:
                info = {"args_error": repr(e)}
            t0 = time.perf_counter_ns()
            try:
                return fn(*a, **kw)
            finally:
                rec.complete(name, cat, t0, time.perf_counter_ns(), info)

        return inner

    return wrap


def start(origin_ns: int | None = None) -> Recorder:
    """Begin recording in this process (e.g. in a worker, at the driver's request)."""
    global _active
    _active = Recorder(origin_ns)
    return _active


def stop() -> list[dict]:
    """End recording in this process; returns the raw events (to merge elsewhere)."""
    global _active
    rec, _active = _active, None
    return list(rec.events) if rec is not None else []


def merge(events: list[dict], origin_ns: int | None = None) -> Recorder:
    """A Recorder holding events recorded in several processes (for chrome_events/save)."""
    rec = Recorder(origin_ns)
    rec.events.extend(events)
    return rec


@contextmanager
def recording(rec: Recorder | None = None):
    """Make `rec` (or a new Recorder) the active one for the block; yields it."""
    global _active
    prev = _active
    _active = rec or Recorder()
    try:
        yield _active
    finally:
        _active = prev
