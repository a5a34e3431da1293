"""The engine behind the server: validated requests in, streamed chunks out.

`Engine` is the interface `mirror.server` talks to; `LocalEngine` runs every method in this
process on one model. A distributed engine (target and draft workers elsewhere) implements the
same two things - `prepare` (inherited: validation needs only a tokenizer, the context length
and the default SpecConfig) and `generate` - and the server does not change.

    engine = LocalEngine(model, tokenizer, SpecConfig(method="ar"))
    args = engine.prepare(generate_pb2.GenerateRequest(prompt="Hi", max_tokens=8))
    async for chunk in engine.generate(args, asyncio.Event()):
        print(chunk.text, end="")       # the last chunk has finish_reason and usage
"""
from __future__ import annotations

import abc
import asyncio
import collections
import dataclasses
import logging
import math
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .decoding.result import GenerationResult, Metrics
from .spec_config import METHODS, SpecConfig

if TYPE_CHECKING:  # Chunk and Usage are also the client's types: importing them needs no torch
    from .sampling import SamplingParams
    from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "cancelled", "error")
ROLES = ("system", "user", "assistant")
DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


@dataclass(slots=True)
class GenerateArgs:
    """A validated request: what every engine receives."""

    prompt_ids: list[int]
    params: SamplingParams
    spec: SpecConfig  # spec.method is the method to run
    request_id: str = ""


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tau: float = 0.0
    acceptance_rate: float = 0.0
    hit_rate: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    tokens_per_s: float = 0.0

    @classmethod
    def from_metrics(cls, m: Metrics) -> "Usage":
        return cls(m.prompt_tokens, m.new_tokens, m.tau, m.acceptance_rate, m.hit_rate,
                   m.prefill_s * 1e3, m.decode_s * 1e3, m.tokens_per_s)


@dataclass(slots=True)
class Chunk:
    """New output since the previous chunk. The last chunk of a request has `finish_reason`
    (one of FINISH_REASONS) and `usage`; `error` says what failed when it is "error"."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str = ""
    method: str = ""


def validate_request(request, tokenizer: Tokenizer, context_len: int, default_spec: SpecConfig,
                     default_max_tokens: int = DEFAULT_MAX_TOKENS) -> GenerateArgs:
    """A `mirror.v1.GenerateRequest` -> GenerateArgs, or ValueError naming the problem.

    The one place requests are checked: the server turns the ValueError into INVALID_ARGUMENT,
    so nothing invalid reaches an engine."""
    from .sampling import SamplingParams

    method = request.method or default_spec.method
    if method not in METHODS:
        raise ValueError(f"unknown method {request.method!r}; choose one of {', '.join(METHODS)}")
    spec = default_spec if method == default_spec.method else dataclasses.replace(default_spec, method=method)

    if request.HasField("max_tokens") and request.max_tokens <= 0:
        raise ValueError(f"max_tokens must be a positive integer, got {request.max_tokens}")
    if request.HasField("temperature"):
        t = request.temperature
        if math.isnan(t) or math.isinf(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t}")
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if math.isnan(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if request.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {request.top_k}")
    if len(request.stop) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(request.stop)}")
    for s in request.stop:
        if not s:
            raise ValueError("stop strings must be non-empty")
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters, got {len(s)}")
    vocab = tokenizer.vocab_size
    bad = [i for i in request.stop_token_ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"stop_token_ids must be token ids in [0, {vocab}), got {bad[0]}")

    prompt_ids = _encode_input(request, tokenizer)
    margin = spec.gamma + 1 if method != "ar" else 0  # the target's KV also holds a draft window
    room = context_len - len(prompt_ids) - margin
    window = f" + the draft window ({margin})" if margin else ""
    if room <= 0:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens){window} leaves no room for output in the "
                         f"model's context of {context_len} tokens")
    max_tokens = request.max_tokens if request.HasField("max_tokens") else min(default_max_tokens, room)
    if max_tokens > room:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}){window} "
                         f"exceeds the model's context of {context_len} tokens")
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=request.temperature if request.HasField("temperature") else 0.0,
        top_k=request.top_k, top_p=top_p,
        seed=request.seed if request.HasField("seed") else None,
        stop=list(request.stop), stop_token_ids=list(request.stop_token_ids),
        ignore_eos=request.ignore_eos)
    return GenerateArgs(prompt_ids, params, spec, request.request_id)


def _encode_input(request, tokenizer: Tokenizer) -> list[int]:
    kind = request.WhichOneof("input")
    if kind is None:
        raise ValueError("the request has no input: set prompt or messages")
    if kind == "prompt":
        if not request.prompt.strip():
            raise ValueError("the prompt is empty")
        if request.raw or not tokenizer.chat_template:
            return tokenizer.encode(request.prompt)
        msgs = [{"role": "user", "content": request.prompt}]
    else:
        if request.raw:
            raise ValueError("raw applies to a prompt, not to messages")
        if not request.messages.messages:
            raise ValueError("messages is empty")
        msgs = []
        for i, m in enumerate(request.messages.messages):
            if m.role not in ROLES:
                raise ValueError(f"messages[{i}]: unknown role {m.role!r}; choose one of {', '.join(ROLES)}")
            if not m.content.strip():
                raise ValueError(f"messages[{i}]: the content is empty")
            msgs.append({"role": m.role, "content": m.content})
        if not tokenizer.chat_template:
            raise ValueError("this model has no chat template: send a prompt with raw instead of messages")
    from jinja2 import TemplateError

    try:
        return tokenizer.encode_chat(msgs)
    except TemplateError as e:
        raise ValueError(f"the chat template failed on these messages: {e}") from e


class Engine(abc.ABC):
    """What the server needs: request validation and a chunk stream per request.

    Subclasses set `tokenizer`, `context_len` (the model's maximum sequence length) and
    `default_spec` (its method is the default for requests that name none)."""

    tokenizer: Tokenizer
    context_len: int
    default_spec: SpecConfig

    def prepare(self, request) -> GenerateArgs:
        """Validate a `mirror.v1.GenerateRequest`; ValueError names the problem."""
        return validate_request(request, self.tokenizer, self.context_len, self.default_spec)

    @abc.abstractmethod
    def generate(self, args: GenerateArgs, cancel: asyncio.Event) -> AsyncIterator[Chunk]:
        """Stream the output of one request. Once `cancel` is set the engine stops decoding
        promptly and ends with finish_reason "cancelled". Closing the iterator early (the
        consumer went away) counts as a cancel. Failures end the stream with an "error" chunk
        rather than raising."""

    async def close(self) -> None:
        """Release workers; the engine takes no requests afterwards."""


@dataclass(slots=True)
class Completed:
    """A finished request, as the engine saw it (introspection and tests)."""

    request_id: str
    finish_reason: str
    completion_tokens: int


class LocalEngine(Engine):
    """Runs `mirror.decoding.factory.generate` on one model in one worker thread.

    Requests run one at a time in arrival order (the model and its caches are not shared
    between concurrent decodes); a request waiting for the worker can be cancelled before it
    starts. Decoding happens off the event loop, and `on_chunk` callbacks from the worker are
    handed to the loop with `call_soon_threadsafe`, so the server stays responsive (health
    checks, new requests, cancellations) while a request decodes."""

    def __init__(self, model, tokenizer: Tokenizer, default_spec: SpecConfig | None = None,
                 history: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.context_len = model.cfg.max_seq_len
        self.default_spec = default_spec or SpecConfig(method="ar")
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mirror-engine")
        self._lock: asyncio.Lock | None = None  # bound to the serving loop on first use
        self._running = threading.Event()
        self.completed: collections.deque[Completed] = collections.deque(maxlen=history)

    @property
    def busy(self) -> bool:
        """A request is decoding in the worker thread right now."""
        return self._running.is_set()

    async def generate(self, args: GenerateArgs, cancel: asyncio.Event) -> AsyncIterator[Chunk]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        # The worker polls a thread-safe flag rather than the asyncio.Event, which belongs to
        # the loop; a small task on the loop copies one into the other.
        stop = threading.Event()
        watcher = asyncio.ensure_future(_mirror_event(cancel, stop))
        done = object()
        streamed = [0]  # tokens handed out, for the usage of a failed request

        def on_chunk(text: str, ids: list[int]) -> None:
            streamed[0] += len(ids)
            loop.call_soon_threadsafe(queue.put_nowait, Chunk(text, list(ids)))

        def work() -> None:
            self._running.set()
            try:
                res = self._run(args, on_chunk, stop.is_set)
                last = Chunk(finish_reason=res.finish_reason, usage=Usage.from_metrics(res.metrics),
                             method=res.method)
            except Exception as e:  # a failed request must not take the server down
                log.exception("request %s failed", args.request_id or "?")
                last = Chunk(finish_reason="error", error=f"{type(e).__name__}: {e}", method=args.spec.method,
                             usage=Usage(prompt_tokens=len(args.prompt_ids), completion_tokens=streamed[0]))
            finally:
                self._running.clear()
            self.completed.append(Completed(args.request_id, last.finish_reason, last.usage.completion_tokens))
            loop.call_soon_threadsafe(queue.put_nowait, last)
            loop.call_soon_threadsafe(queue.put_nowait, done)

        try:
            async with self._lock:  # waiting here is cancellable; the worker is not yet involved
                if cancel.is_set():
                    yield Chunk(finish_reason="cancelled", usage=Usage(prompt_tokens=len(args.prompt_ids)),
                                method=args.spec.method)
                    return
                future = loop.run_in_executor(self._worker, work)
                try:
                    while (item := await queue.get()) is not done:
                        yield item
                finally:
                    # Consumer gone (client cancelled) or finished: stop decoding and keep the
                    # lock until the worker is free, so requests never overlap on the model.
                    stop.set()
                    await asyncio.shield(future)
        finally:
            watcher.cancel()

    def _run(self, args: GenerateArgs, on_chunk, should_stop) -> GenerationResult:
        from .decoding.factory import generate

        return generate(self.model, self.tokenizer, args.prompt_ids, args.params, args.spec,
                        on_chunk=on_chunk, should_stop=should_stop)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._worker.shutdown)


async def _mirror_event(src: asyncio.Event, dst: threading.Event) -> None:
    await src.wait()
    dst.set()
