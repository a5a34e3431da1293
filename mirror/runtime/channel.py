"""The target <-> draft token channel over gRPC (protos/mirror/v1/channel.proto).

Draft side: `DraftChannelServicer` hosts one `DraftPipeline` per session (one bidirectional
stream per request). Target side: `DraftChannelClient` is what the target loop calls:

    client = DraftChannelClient("127.0.0.1:50052")
    window = client.open(prompt_ids, first_token, gamma, spec, params)   # first DraftWindow
    # or, opened before the target's prefill (the draft prefills the prompt meanwhile):
    client.open(prompt_ids, None, 0, spec, params); ...; window = client.first(first_token, gamma)
    client.send_signal(signal)          # returns at once; the draft starts branch rollouts
    ...                                 # target suffix runs meanwhile
    window = client.send_verdict(verdict, gamma)   # blocks until the next window arrives - or,
                                        # opened with push_branches, returns at once on a hit
    stats = client.close()              # the draft's DraftStats; the session is freed

Timing (the point of Mirror-SD): on a signal the draft starts `DraftPipeline.on_signal` in the
session's worker thread and goes back to reading the stream. When the verdict arrives it sets
the stop flag, waits for the rollouts to stop at their next batch boundary, then calls
`on_verdict` and sends the window - so the draft expands branches exactly while the target
runs its suffix, and never longer. With `push_branches` (Mirror-SD, the runtime's default) the
draft also sends the finished rollouts to the target before the verdict (`Branches`): when the
verdict is a hit the target takes its next window from them at once and tells the draft so
(`Verdict.taken`), and no window crosses back - a hit costs no round trip.

Threads: gRPC's sync API on both ends. The client hands messages to gRPC's own sender thread
through a queue (sending never blocks the target); the server reads each session's stream in
a handler thread and runs rollouts in one worker thread per session. The handler also sends
the pushed branches: after a signal it waits for that signal's rollouts - at most until the
verdict is expected (the session's running estimate of signal -> verdict) - then goes back to
reading; rollouts still running then are not pushed, and the verdict stops them as before.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, fields

import grpc
import numpy as np
import torch

from .. import trace
from ..decoding.drafters.base import DraftStats
from ..decoding.messages import DraftWindow, EarlyExitSignal, Verdict
from ..decoding.speculative import DraftPipeline
from ..proto.mirror.v1 import channel_pb2 as pb
from ..proto.mirror.v1 import channel_pb2_grpc
from ..sampling import SamplingParams
from ..spec_config import SpecConfig

log = logging.getLogger(__name__)

_OPTIONAL_PATHS = ("draft_model", "adapter", "exit_head", "vocab_trim", "ngram_datastore", "window_stop",
                   "int8_calib")  # None <-> ""
_DEFAULTED = ("rollout_stop", "draft_quant", "draft_prefill", "catch_up")  # "" -> SpecConfig's default
_MESSAGE_MB = 64  # stochastic windows carry [G, vocab] floats (~1 MB at G=5, V=49152)
_GRPC_OPTIONS = [("grpc.max_send_message_length", _MESSAGE_MB << 20),
                 ("grpc.max_receive_message_length", _MESSAGE_MB << 20)]


_END = object()  # ends the client's request queue


class ChannelError(RuntimeError):
    """The draft side reported an error, or the stream broke."""


# --- conversions between mirror.decoding.messages and the protos --------------------------------
def _wire_fields() -> list[str]:
    """SpecConfig fields the channel carries. Where the draft runs (draft_backend, onnx_*) is
    not among them: the draft worker's deployment decides that (DraftWorker._apply_backend)."""
    return [f.name for f in fields(SpecConfig) if f.name in pb.SpecConfig.DESCRIPTOR.fields_by_name]


def spec_to_proto(spec: SpecConfig) -> pb.SpecConfig:
    return pb.SpecConfig(**{n: ("" if getattr(spec, n) is None else getattr(spec, n)) for n in _wire_fields()})


def spec_from_proto(msg: pb.SpecConfig) -> SpecConfig:
    d = {n: getattr(msg, n) for n in _wire_fields()}
    for k in _OPTIONAL_PATHS:
        d[k] = d[k] or None
    for k in _DEFAULTED:  # empty: a peer that does not send the field gets the default
        if k in d and not d[k]:
            del d[k]
    return SpecConfig(**d)


def sampling_to_proto(params: SamplingParams) -> pb.DraftSampling:
    return pb.DraftSampling(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                            seed=params.seed, max_new_tokens=params.max_new_tokens)


def sampling_from_proto(msg: pb.DraftSampling) -> SamplingParams:
    return SamplingParams(max_new_tokens=msg.max_new_tokens, temperature=msg.temperature, top_k=msg.top_k,
                          top_p=msg.top_p, seed=msg.seed if msg.HasField("seed") else None)


def signal_to_proto(signal: EarlyExitSignal) -> pb.EarlyExitSignal:
    kappa = signal.top_ids.shape[-1]
    return pb.EarlyExitSignal(step=signal.step, kappa=kappa, top_ids=signal.top_ids.reshape(-1).tolist(),
                              top_logprobs=signal.top_logprobs.reshape(-1).tolist(), rows=signal.rows)


def signal_from_proto(msg: pb.EarlyExitSignal) -> EarlyExitSignal:
    ids = torch.tensor(msg.top_ids, dtype=torch.long).view(-1, msg.kappa)  # [G+1, kappa]
    logp = torch.tensor(msg.top_logprobs, dtype=torch.float32).view(-1, msg.kappa)  # [G+1, kappa]
    return EarlyExitSignal(msg.step, ids, logp, msg.rows)


def window_to_proto(window: DraftWindow, step: int) -> pb.DraftWindow:
    msg = pb.DraftWindow(step=step, ids=window.ids, source=window.source)
    if window.probs is not None:  # [G, V]
        msg.vocab_size = window.probs.shape[-1]
        msg.probs = window.probs.float().contiguous().numpy().astype("<f4", copy=False).tobytes()
    return msg


def window_from_proto(msg: pb.DraftWindow) -> DraftWindow:
    probs = None
    if msg.vocab_size:
        flat = np.frombuffer(msg.probs, dtype="<f4").astype(np.float32)  # a writable copy
        probs = torch.from_numpy(flat).view(len(msg.ids), msg.vocab_size)  # [G, V]
    return DraftWindow(list(msg.ids), probs, msg.source)


def stats_from_proto(msg: pb.DraftStats) -> DraftStats:
    return DraftStats(msg.computed, msg.used, msg.hits, msg.misses, msg.branches, dict(msg.by_source),
                      msg.expand_s, msg.overrun_s, msg.verdict_s, msg.prepare_s, msg.pre_branches, msg.pre_hits,
                      msg.taken, msg.early)


# --- draft side --------------------------------------------------------------------------------
@dataclass(slots=True)
class SessionRequest:
    """A decoded Open message: what a DraftFactory builds a pipeline from."""

    session_id: str
    prompt_ids: list[int]
    first_token: int
    gamma: int
    spec: SpecConfig
    params: SamplingParams

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + [self.first_token]

    @property
    def max_len(self) -> int:
        """Longest context the draft will see (mirror.decoding.factory.draft_max_len)."""
        from ..decoding.factory import draft_max_len

        return draft_max_len(len(self.prompt_ids), self.params, self.spec)


DraftFactory = Callable[[SessionRequest], DraftPipeline]


def model_draft_factory(target_model) -> DraftFactory:
    """Drafts built by `build_drafter` over `target_model` (self-drafts share its weights; a
    separate draft model comes from `spec.draft_model`), as the in-process path builds them."""
    from ..decoding.factory import build_drafter

    def factory(req: SessionRequest) -> DraftPipeline:
        return DraftPipeline(build_drafter(target_model, req.spec, req.params, req.max_len), req.spec)

    return factory


@dataclass(slots=True)
class _PromptKV:
    """The prompt's K/V received so far ([layers, kv_heads, n, head_dim] each, from the first
    slice's shape), which positions of each layer arrived, and how many slices."""

    k: np.ndarray | None = None
    v: np.ndarray | None = None
    covered: np.ndarray | None = None
    count: int = 0


class _Session:
    def __init__(self, req: SessionRequest, pipeline: DraftPipeline, ack_signals: bool,
                 push_branches: bool = False):
        self.req, self.pipeline, self.ack_signals = req, pipeline, ack_signals
        # push_branches: a signal's finished rollouts go to the target before its verdict
        self.push = push_branches and req.spec.method == "mirror"
        self._pushed: tuple[int, set] | None = None  # (step, {(A, t), ...}) last pushed
        self.taken = 0
        self.replied = 0  # hits answered early (rollout_stop="reply")
        self.worker = futures.ThreadPoolExecutor(1, thread_name_prefix=f"draft-{req.session_id[:8]}")
        self.stop = threading.Event()
        self.expansion: futures.Future | None = None
        self.preparing: futures.Future | None = None
        self.closed = False
        self.started = False  # window 0 sent
        self.kv_slices: _PromptKV | None = None  # Open.prompt_kv: the prompt's K/V so far (put_kv)
        # rollout_stop="predict": when the verdict is expected (signal arrival + an average of
        # earlier signal -> verdict times) and how long one rollout step takes
        self._signal_t: float | None = None
        self._suffix_s: float | None = None
        self._deadline: float | None = None
        self._step_s: float | None = None
        self._last_check = 0.0
        # SpecConfig.fill_window: (the verdict's hypothesis, window length) its running rollout
        # goes on to after the verdict, while the others stop
        self._fill: tuple | None = None

    def warm(self) -> None:
        """A deferred open: prefill the prompt while the target prefills it too."""
        with torch.inference_mode():
            self.pipeline.warm(self.req.prompt_ids)

    KV_BYTES_MAX = 16 << 30  # the prompt's K/V a session accepts (k and v, all layers)

    def put_kv(self, kv: pb.PromptKV) -> None:
        """Open.prompt_kv: one slice of the prompt's K/V from the target, checked and copied into
        place as it arrives (the drafter takes the whole at First, `take_kv`)."""
        if self.kv_slices is None:
            raise ValueError("PromptKV without Open.prompt_kv")
        n = len(self.req.prompt_ids)
        size = kv.kv_heads * kv.length * kv.head_dim * 4
        if kv.total != n or kv.length < 1 or kv.start < 0 or kv.start + kv.length > n or kv.layer < 0 \
                or kv.layer >= kv.layers or kv.kv_heads < 1 or kv.head_dim < 1 \
                or len(kv.k) != size or len(kv.v) != size \
                or 2 * kv.layers * kv.kv_heads * n * kv.head_dim * 4 > self.KV_BYTES_MAX:
            raise ValueError(f"malformed PromptKV (layer {kv.layer}, positions {kv.start}+{kv.length} of "
                             f"{kv.total}, prompt {n}, {len(kv.k)} bytes)")
        got = self.kv_slices
        if got.k is None:  # the first slice sets the shape (the layers and heads of the target's cache)
            dims = (kv.layers, kv.kv_heads, n, kv.head_dim)
            got.k, got.v = np.empty(dims, np.float32), np.empty(dims, np.float32)
            got.covered = np.zeros((kv.layers, n), bool)
        elif (kv.layers, kv.kv_heads, kv.head_dim) != tuple(got.k.shape[i] for i in (0, 1, 3)):
            raise ValueError("PromptKV slices of different shapes")
        shape = (kv.kv_heads, kv.length, kv.head_dim)
        at = slice(kv.start, kv.start + kv.length)
        got.k[kv.layer, :, at] = np.frombuffer(kv.k, np.float32).reshape(shape)
        got.v[kv.layer, :, at] = np.frombuffer(kv.v, np.float32).reshape(shape)
        got.covered[kv.layer, at] = True
        got.count += 1

    def take_kv(self) -> bool:
        """At First, after Open.prompt_kv: hand the prompt's K/V to the drafter, or (it cannot
        take them, or they do not cover the prompt) prefill the prompt now. Returns whether
        the drafter took them."""
        got, self.kv_slices = self.kv_slices, None
        n = len(self.req.prompt_ids)
        whole = got.k is not None and bool(got.covered.all())
        adopt = getattr(self.pipeline.drafter, "adopt_kv", None)  # (a duck-typed drafter may have none)
        with torch.inference_mode(), trace.span("draft.take_kv", "draft", tokens=n, slices=got.count):
            took = whole and adopt is not None and adopt(self.req.prompt_ids, torch.from_numpy(got.k),
                                                         torch.from_numpy(got.v))
        if not took:
            log.warning("the draft could not take the prompt's K/V (%d slices); it prefills the prompt itself",
                        got.count)
            self.warm()
        return took

    def start(self) -> DraftWindow:
        self.started = True
        with torch.inference_mode():
            return self.pipeline.start(self.req.context, self.req.gamma)

    def window_sent(self) -> None:
        """The window is on its way: prepare the rollouts while the target runs its prefix (the
        window's draft KV, and with spec.pre_budget the draft's own most likely hypotheses; the
        worker runs this before the signal's expansion, which skips what it did)."""
        if self.req.spec.method == "mirror" and not self.closed:
            self.stop.clear()  # the next verdict stops the pre-signal rollouts too
            self._deadline = None  # known once the signal is here
            self.preparing = self.worker.submit(self._prepare)

    def _prepare(self) -> None:
        self._last_check = time.perf_counter()
        with torch.inference_mode():
            self.pipeline.prepare(should_stop=self._should_stop)

    def on_signal(self, signal: EarlyExitSignal) -> None:
        if self.expansion is not None:  # a signal without a verdict in between: drop the old rollouts
            self._finish_expansion()
            self.stop.clear()
        self._signal_t = time.perf_counter()
        predict = self.req.spec.rollout_stop == "predict" and self._suffix_s is not None
        self._deadline = self._signal_t + self._suffix_s if predict else None
        self.expansion = self.worker.submit(self._expand, signal)

    def _expand(self, signal: EarlyExitSignal) -> int:
        self._last_check = time.perf_counter()
        with torch.inference_mode():
            return self.pipeline.on_signal(signal, should_stop=self._should_stop)

    def branches(self, step: int) -> pb.DraftMessage | None:
        """(Handler thread, after a signal) this signal's rollouts to push, once they are done -
        waiting at most until the verdict is expected; None: not done by then, or nothing to push."""
        if not self.push or self.expansion is None or self._signal_t is None or self._suffix_s is None:
            return None  # (no estimate yet - a session's first signal - no wait: the verdict comes first)
        wait = self._signal_t + 0.9 * self._suffix_s - time.perf_counter()
        done, _ = futures.wait([self.expansion], timeout=max(0.0, wait))
        if not done or self.expansion.exception() is not None:
            return None  # (a failed expansion is reported at the verdict, as without pushing)
        ready = getattr(self.pipeline.drafter, "ready", None)  # (a duck-typed drafter may have none)
        ready = {k: w for k, w in ready().items() if w.probs is None} if ready is not None else {}
        if not ready:
            return None
        self._pushed = (step, set(ready))
        return pb.DraftMessage(branches=pb.Branches(step=step, branches=[
            pb.Branch(accepted=a, token=t, ids=w.ids, source=w.source) for (a, t), w in ready.items()]))

    def _should_stop(self) -> bool:
        """Asked by the drafter between rollout steps: stop once the verdict is here, or (predict)
        rather than start a step that would end after the verdict's expected arrival."""
        if self.stop.is_set():
            return not self._filling()
        if self._deadline is None:
            return False
        now = time.perf_counter()
        step, self._last_check = now - self._last_check, now
        self._step_s = step if self._step_s is None else 0.5 * (self._step_s + step)
        return now + self._step_s > self._deadline

    def _filling(self) -> bool:
        """Whether the verdict's hypothesis is being rolled out and its window is still shorter
        than fill_window (then the rollout goes on)."""
        fill = self._fill
        rolling = getattr(self.pipeline.drafter, "rolling", None)  # (a duck-typed drafter may have none)
        if fill is None or rolling is None:
            return False
        length = rolling(fill[0])
        return length is not None and length < fill[1]

    def _finish_expansion(self) -> None:
        t = time.perf_counter()
        self.stop.set()  # ends the signal's rollouts and any pre-signal ones (prepare)
        if self.expansion is not None:
            fut, self.expansion = self.expansion, None
            fut.result()  # re-raises a failed expansion
        if self.preparing is not None:
            fut, self.preparing = self.preparing, None
            fut.result()
        self.pipeline.drafter.stats.overrun_s += time.perf_counter() - t  # draft work past the verdict

    def early(self, verdict: Verdict) -> DraftWindow | None:
        """rollout_stop="reply" (Mirror-SD, greedy): the window a hit has so far, to send before
        the rollouts stop - the step still running then feeds the window's last token, the first
        draft step of the next window - or None (a miss, or no token drafted yet: wait as usual)."""
        if self.req.spec.rollout_stop != "reply" or self.req.spec.method != "mirror" or not self.req.params.greedy:
            return None
        peek = getattr(self.pipeline.drafter, "peek", None)  # (a duck-typed drafter may have none)
        return peek(verdict) if peek is not None else None

    def on_verdict(self, verdict: Verdict, gamma: int, taken: bool = False,
                   sent: DraftWindow | None = None) -> DraftWindow:
        """The next window; with `taken`, the pushed branch the target already holds (checked);
        with `sent`, the window `early` gave, already sent."""
        if self._signal_t is not None:  # how long after its signal a verdict arrives
            seen, self._signal_t = time.perf_counter() - self._signal_t, None
            self._suffix_s = seen if self._suffix_s is None else 0.8 * self._suffix_s + 0.2 * seen
        spec = self.req.spec
        if spec.fill_window and spec.method == "mirror" and sent is None and not taken:
            self._fill = ((verdict.accepted, verdict.token), min(spec.fill_window, spec.gamma))
        try:
            self._finish_expansion()
        finally:
            self._fill = None
        pushed, self._pushed = self._pushed, None
        key = (verdict.accepted, verdict.token)
        if taken and (pushed is None or pushed[0] != verdict.step or key not in pushed[1]):
            raise ValueError(f"verdict of step {verdict.step} takes branch {key}, which was not pushed")
        with torch.inference_mode():
            w = self.pipeline.on_verdict(verdict, gamma) if sent is None else \
                self.pipeline.on_verdict(verdict, gamma, sent)  # (taken: the pushed branch - `take` on a hit)
        self.taken += taken
        self.replied += sent is not None
        return w

    def stats(self) -> pb.DraftStats:
        st = self.pipeline.drafter.totals()
        return pb.DraftStats(computed=st.computed, used=st.used, hits=st.hits, misses=st.misses,
                             branches=st.branches, by_source={str(k): int(v) for k, v in st.by_source.items()},
                             expand_s=st.expand_s, overrun_s=st.overrun_s, verdict_s=st.verdict_s,
                             prepare_s=st.prepare_s, pre_branches=st.pre_branches, pre_hits=st.pre_hits,
                             taken=self.taken, early=self.replied)

    def close(self) -> None:
        """Idempotent; from the handler thread or gRPC's termination callback."""
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        self.worker.shutdown(wait=True, cancel_futures=True)  # a running expansion stops at its next batch
        self.pipeline.drafter.close()


class DraftChannelServicer(channel_pb2_grpc.DraftChannelServicer):
    """Hosts DraftPipelines, one per Session stream. `sessions` maps session id -> live session."""

    def __init__(self, factory: DraftFactory):
        self.factory = factory
        self.sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def _drop(self, session: _Session | None) -> None:
        if session is None:
            return
        session.close()  # first, so a session missing from the table is fully closed
        with self._lock:
            if self.sessions.get(session.req.session_id) is session:
                del self.sessions[session.req.session_id]

    def Session(self, request_iterator, context):
        session: _Session | None = None
        # Runs when the RPC ends for any reason - also when the target vanishes while this
        # handler is not being resumed - so a session never outlives its stream.
        context.add_callback(lambda: self._drop(session))
        try:
            for msg in request_iterator:
                kind = msg.WhichOneof("kind")
                if kind == "open":
                    if session is not None:
                        raise ValueError("the session is already open")
                    o = msg.open
                    req = SessionRequest(o.session_id or uuid.uuid4().hex, list(o.prompt_ids), o.first_token,
                                         o.gamma, spec_from_proto(o.spec), sampling_from_proto(o.sampling))
                    session = _Session(req, self.factory(req), o.ack_signals, o.push_branches)
                    with self._lock:
                        if req.session_id in self.sessions:
                            session.close()
                            session = None
                            raise ValueError(f"session {req.session_id!r} already exists")
                        self.sessions[req.session_id] = session
                    if o.defer_first and o.prompt_kv:  # the prompt's K/V come from the target, then First
                        session.kv_slices = _PromptKV()
                    elif o.defer_first:  # the first token comes later (First): prefill meanwhile
                        session.warm()
                    elif o.prompt_kv:
                        raise ValueError("Open.prompt_kv needs Open.defer_first")
                    else:
                        yield pb.DraftMessage(window=window_to_proto(session.start(), step=0))
                        session.window_sent()
                elif session is None:
                    raise ValueError(f"{kind} before open")
                elif kind == "first":
                    if session.started:
                        raise ValueError("first token after the first window (open was not deferred)")
                    session.req.first_token, session.req.gamma = msg.first.token, msg.first.gamma
                    if session.kv_slices is not None:
                        session.take_kv()
                    yield pb.DraftMessage(window=window_to_proto(session.start(), step=0))
                    session.window_sent()
                elif kind == "kv":
                    if session.started:
                        raise ValueError("PromptKV after the first window")
                    session.put_kv(msg.kv)
                elif not session.started and kind in ("signal", "verdict"):
                    raise ValueError(f"{kind} before the first token")
                elif kind == "signal":
                    session.on_signal(signal_from_proto(msg.signal))
                    if session.ack_signals:
                        yield pb.DraftMessage(ready=pb.Ready(step=msg.signal.step))
                    if (branches := session.branches(msg.signal.step)) is not None:
                        yield branches
                elif kind == "verdict":
                    v = msg.verdict
                    verdict = Verdict(v.step, v.accepted, v.token)
                    sent = None if v.taken else session.early(verdict)
                    if sent is not None:  # a hit answered before its rollout stops
                        yield pb.DraftMessage(window=window_to_proto(sent, step=v.step + 1))
                    window = session.on_verdict(verdict, v.gamma, v.taken, sent)
                    if not v.taken and sent is None:  # (taken: the target holds this window already)
                        yield pb.DraftMessage(window=window_to_proto(window, step=v.step + 1))
                    session.window_sent()
                elif kind == "close":
                    session._finish_expansion()
                    stats = session.stats()
                    self._drop(session)  # freed before the target hears back
                    yield pb.DraftMessage(stats=stats)
                    return
                else:  # cancel
                    return
        except Exception as e:  # report to the target; the finally frees the session
            log.exception("draft session failed")
            yield pb.DraftMessage(error=pb.Error(message=f"{type(e).__name__}: {e}"))
        finally:
            self._drop(session)


class DraftServer:
    """A sync gRPC server hosting a DraftChannelServicer (one handler thread per session)."""

    def __init__(self, factory: DraftFactory, host: str = "127.0.0.1", port: int = 0, max_sessions: int = 8):
        self.servicer = DraftChannelServicer(factory)
        # + 2: a session handler per stream, and spare threads for streams that are closing
        self.server = grpc.server(futures.ThreadPoolExecutor(max_sessions + 2, thread_name_prefix="draft-rpc"),
                                  options=_GRPC_OPTIONS, maximum_concurrent_rpcs=max_sessions)
        channel_pb2_grpc.add_DraftChannelServicer_to_server(self.servicer, self.server)
        self.host = host
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind {host}:{port}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "DraftServer":
        self.server.start()
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        self.server.stop(grace).wait()

    def __enter__(self) -> "DraftServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- target side -------------------------------------------------------------------------------
class DraftChannelClient:
    """The target's end of one session at a time (open -> signals/verdicts -> close)."""

    def __init__(self, target: str = "127.0.0.1:50052", channel: grpc.Channel | None = None,
                 session_timeout: float | None = None, reply_timeout: float | None = None):
        """`session_timeout`: a deadline in seconds for each whole session (None = none).
        `reply_timeout`: how long to wait for any one draft reply; a draft slower than this is
        treated as stalled (ChannelError), which the runtime turns into target-only decoding."""
        self.session_timeout = session_timeout
        self.reply_timeout = reply_timeout
        self._inbox: queue.SimpleQueue | None = None
        self.channel = channel or grpc.insecure_channel(target, options=_GRPC_OPTIONS)
        self._own_channel = channel is None
        self.stub = channel_pb2_grpc.DraftChannelStub(self.channel)
        self._out: queue.SimpleQueue | None = None
        self._call = None
        self.session_id: str | None = None
        self._step = 0
        self._held: deque = deque()  # replies read ahead while looking for pushed branches
        self._pushed: pb.Branches | None = None  # the last Branches (its step's pushed rollouts)
        self.taken = 0  # windows taken from pushed branches in this client's sessions

    @property
    def is_open(self) -> bool:
        return self._call is not None

    def _send(self, msg: pb.TargetMessage) -> None:
        if self._out is None:
            raise ChannelError("no open session")
        self._out.put(msg)

    def _read(self, call, inbox: queue.SimpleQueue) -> None:
        """Reader thread: replies (or the stream's end/error) into the inbox, so waits can time out."""
        try:
            for msg in call:
                inbox.put(msg)
            inbox.put(StopIteration())
        except grpc.RpcError as e:
            inbox.put(e)

    def _drain(self) -> None:
        """Take in what has arrived without waiting: pushed branches are kept, anything else is
        held for the next `_recv`."""
        if self._inbox is None:
            raise ChannelError("no open session")
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if not self._keep_pushed(msg):
                self._held.append(msg)

    def _keep_pushed(self, msg) -> bool:
        """Pushed rollouts are kept for the verdict they belong to (True); other inbox items -
        windows, acks, stats, stream ends, errors - are not."""
        if isinstance(msg, pb.DraftMessage) and msg.WhichOneof("kind") == "branches":
            self._pushed = msg.branches
            return True
        return False

    def _recv(self, expect: str):
        if self._inbox is None:
            raise ChannelError("no open session")
        deadline = None if self.reply_timeout is None else time.perf_counter() + self.reply_timeout
        while True:
            if self._held:
                msg = self._held.popleft()
            else:
                try:
                    wait = None if deadline is None else max(0.0, deadline - time.perf_counter())
                    msg = self._inbox.get(timeout=wait)
                except queue.Empty:
                    self._end(cancel=True)
                    raise ChannelError(f"the draft stalled: no {expect} within {self.reply_timeout:.3f} s") from None
            if not self._keep_pushed(msg):
                break
        if isinstance(msg, StopIteration):
            self._end()
            raise ChannelError(f"the draft ended the session while the target waited for {expect}")
        if isinstance(msg, grpc.RpcError):
            self._end()
            raise ChannelError(f"draft channel broke: {msg.code().name}: {msg.details()}")
        kind = msg.WhichOneof("kind")
        if kind == "error":
            self._end()
            raise ChannelError(f"draft error: {msg.error.message}")
        if kind != expect:
            self._end(cancel=True)
            raise ChannelError(f"draft sent {kind}, expected {expect}")
        return getattr(msg, kind)

    def _window(self, step: int) -> DraftWindow:
        w = self._recv("window")
        if w.step != step:
            self._end(cancel=True)
            raise ChannelError(f"draft window for step {w.step}, expected {step}")
        return window_from_proto(w)

    def open(self, prompt_ids: list[int], first_token: int | None, gamma: int, spec: SpecConfig,
             params: SamplingParams, session_id: str | None = None,
             ack_signals: bool = False, push_branches: bool = False, prompt_kv: bool = False) -> DraftWindow | None:
        """Start a session; returns the draft's first window (drafted from prompt + first token).
        With `first_token=None` it returns at once (None): the draft prefills the prompt while
        the target prefills it, and `first(token, gamma)` then returns the first window.
        `push_branches` (Mirror-SD): the draft sends each signal's finished rollouts before the
        verdict, and `send_verdict` returns a hit's window without waiting. `prompt_kv` (deferred
        opens): the draft waits for `send_prompt_kv` instead of prefilling the prompt."""
        if self.is_open:
            raise ChannelError("a session is already open on this client")
        if prompt_kv and first_token is not None:
            raise ChannelError("prompt_kv needs a deferred open (first_token=None)")
        self.session_id = session_id or uuid.uuid4().hex
        self._out = queue.SimpleQueue()
        self._call = self.stub.Session(iter(self._out.get, _END), timeout=self.session_timeout)
        self._inbox = queue.SimpleQueue()
        threading.Thread(target=self._read, args=(self._call, self._inbox), daemon=True,
                         name="draft-channel-reader").start()
        self._send(pb.TargetMessage(open=pb.Open(
            session_id=self.session_id, prompt_ids=prompt_ids, first_token=first_token or 0, gamma=gamma,
            spec=spec_to_proto(spec), sampling=sampling_to_proto(params), ack_signals=ack_signals,
            defer_first=first_token is None, push_branches=push_branches, prompt_kv=prompt_kv)))
        return None if first_token is None else self._window(0)

    KV_SLICE_BYTES = 4 << 20  # a PromptKV message carries at most about this much of k (and of v)

    def send_prompt_kv(self, cache, n: int) -> int:
        """After a deferred open with prompt_kv: the first `n` positions of `cache` row 0 (every
        layer) as PromptKV slices; returns the bytes sent. Returns at once (queued)."""
        L, _, H, _, D = cache.k.shape
        first = getattr(getattr(cache, "layers", None), "start", 0)
        step = max(1, self.KV_SLICE_BYTES // (H * D * 4))
        sent = 0
        for i in range(L):
            for s in range(0, n, step):
                e = min(n, s + step)
                k = cache.k[i, 0, :, s:e].float().numpy().tobytes()  # (one copy, C order)
                v = cache.v[i, 0, :, s:e].float().numpy().tobytes()
                self._send(pb.TargetMessage(kv=pb.PromptKV(layer=first + i, layers=first + L, start=s, length=e - s,
                                                           total=n, kv_heads=H, head_dim=D, k=k, v=v)))
                sent += len(k) + len(v)
        return sent

    def first(self, token: int, gamma: int) -> DraftWindow:
        """After a deferred open: the target's first token; blocks until the first window arrives."""
        self._send(pb.TargetMessage(first=pb.First(token=token, gamma=gamma)))
        return self._window(0)

    def send_signal(self, signal: EarlyExitSignal) -> None:
        """Hand the early-exit signal to the draft; returns without waiting."""
        self._send(pb.TargetMessage(signal=signal_to_proto(signal)))

    def wait_ready(self) -> int:
        """With ack_signals: block until the draft acknowledges a signal; returns its step."""
        return self._recv("ready").step

    def send_verdict(self, verdict: Verdict, gamma: int) -> DraftWindow:
        """Send the verdict; returns the next window (of at most `gamma` tokens when drafted
        now). A hit among the branches pushed for this step is returned at once - the draft is
        told it was taken; otherwise this blocks until the draft's window arrives."""
        self._drain()
        pushed, self._pushed, w = self._pushed, None, None
        if pushed is not None and pushed.step == verdict.step:  # (a scan: ~48 entries, no dict to build)
            for b in pushed.branches:
                if b.accepted == verdict.accepted and b.token == verdict.token:
                    w = DraftWindow(list(b.ids), None, b.source)
                    break
        self._send(pb.TargetMessage(verdict=pb.Verdict(step=verdict.step, accepted=verdict.accepted,
                                                       token=verdict.token, gamma=gamma, taken=w is not None)))
        if w is not None:
            self.taken += 1
            return w
        return self._window(verdict.step + 1)

    def close(self) -> DraftStats:
        """End the session normally; returns the draft's counters for it."""
        if not self.is_open:
            return DraftStats()
        self._send(pb.TargetMessage(close=pb.Close()))
        stats = stats_from_proto(self._recv("stats"))
        self._end()
        return stats

    def cancel(self) -> None:
        """Abandon the session (idempotent): the draft stops and frees it."""
        if self.is_open:
            self._send(pb.TargetMessage(cancel=pb.Cancel()))
            self._end(cancel=True)

    def _end(self, cancel: bool = False) -> None:
        if self._out is not None:
            self._out.put(_END)
        if cancel and self._call is not None:
            self._call.cancel()
        self._out, self._call, self.session_id, self._inbox = None, None, None, None
        self._held.clear()
        self._pushed = None

    def shutdown(self) -> None:
        """Cancel any session and close the gRPC channel if this client made it."""
        self.cancel()
        if self._own_channel:
            self.channel.close()

    def __enter__(self) -> "DraftChannelClient":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
