"""The gRPC server: `mirror.v1.Generate` over an Engine, plus grpc.health.v1 and reflection.

    server = MirrorServer(LocalEngine(model, tokenizer), host="127.0.0.1", port=50051)
    port = await server.start()
    await server.wait()

Statuses: a request that fails validation gets INVALID_ARGUMENT with the validation message
and never reaches the engine; a failure while decoding ends the stream with finish_reason
ERROR (and `error` set); anything else unexpected is INTERNAL. None of them stops the server.
A client that cancels its call (or disconnects) sets the engine's cancel event.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .engine import Chunk, Engine
from .proto.mirror.v1 import generate_pb2, generate_pb2_grpc

log = logging.getLogger(__name__)

GENERATE_SERVICE = generate_pb2.DESCRIPTOR.services_by_name["Generate"].full_name
FINISH_REASON = {"stop": generate_pb2.STOP, "length": generate_pb2.LENGTH,
                 "cancelled": generate_pb2.CANCELLED, "error": generate_pb2.ERROR}


def chunk_to_proto(chunk: Chunk, request_id: str = "") -> generate_pb2.GenerateResponse:
    msg = generate_pb2.GenerateResponse(text=chunk.text, token_ids=chunk.token_ids)
    if chunk.finish_reason is not None:
        msg.finish_reason = FINISH_REASON[chunk.finish_reason]
        msg.request_id, msg.method, msg.error = request_id, chunk.method, chunk.error
        if chunk.usage is not None:
            u = chunk.usage
            msg.usage.CopyFrom(generate_pb2.Usage(
                prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, tau=u.tau,
                acceptance_rate=u.acceptance_rate, hit_rate=u.hit_rate, prefill_ms=u.prefill_ms,
                decode_ms=u.decode_ms, tokens_per_s=u.tokens_per_s))
    return msg


class GenerateService(generate_pb2_grpc.GenerateServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    async def Generate(self, request, context: grpc.aio.ServicerContext):
        try:
            args = self.engine.prepare(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        loop = asyncio.get_running_loop()
        cancel = asyncio.Event()
        # Runs when the RPC ends for any reason, including a client cancel or disconnect while
        # the handler is blocked waiting for the engine's next chunk.
        context.add_done_callback(lambda _ctx: loop.call_soon_threadsafe(cancel.set))
        try:
            async with contextlib.aclosing(self.engine.generate(args, cancel)) as chunks:
                async for chunk in chunks:
                    yield chunk_to_proto(chunk, args.request_id)
        except asyncio.CancelledError:
            cancel.set()
            raise
        except Exception as e:  # the engine broke its contract; keep serving other requests
            log.exception("Generate %s failed", args.request_id or "?")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")


class MirrorServer:
    """A grpc.aio server hosting Generate, health and reflection for one Engine."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 50051,
                 max_message_mb: int = 64):
        self.engine, self.host, self.port = engine, host, port
        self.options = [("grpc.max_send_message_length", max_message_mb << 20),
                        ("grpc.max_receive_message_length", max_message_mb << 20)]
        self.server: grpc.aio.Server | None = None
        self.health: health.aio.HealthServicer | None = None

    def _build(self) -> None:
        # grpc.aio objects bind to the running event loop, so they are made in start()
        self.server = grpc.aio.server(options=self.options)
        generate_pb2_grpc.add_GenerateServicer_to_server(GenerateService(self.engine), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (GENERATE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> int:
        """Bind and start; returns the port (useful with port=0, which picks a free one)."""
        self._build()
        bound = self.server.add_insecure_port(f"{self.host}:{self.port}")
        if bound == 0:
            raise OSError(f"cannot bind {self.host}:{self.port}")
        self.port = bound
        await self.server.start()
        for name in ("", GENERATE_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("mirror server listening on %s", self.address)
        return bound

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, let running streams finish for `grace` seconds, then stop."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.engine.close()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def serve(engine: Engine, host: str = "127.0.0.1", port: int = 50051, ready=None) -> None:
    """Serve until SIGINT/SIGTERM. `ready(port)` is called once the server listens."""
    server = MirrorServer(engine, host, port)
    bound = await server.start()
    if ready is not None:
        ready(bound)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down")
    await server.stop()


class BackgroundServer:
    """A MirrorServer on its own event loop in a daemon thread (tests, notebooks, benchmarks).

        with BackgroundServer(engine) as srv:
            GenerateClient(srv.address).generate("Hi")
    """

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0):
        self.engine, self.host, self.port = engine, host, port
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="mirror-server", daemon=True)
        self.server: MirrorServer | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "BackgroundServer":
        self._thread.start()
        self.server = MirrorServer(self.engine, self.host, self.port)
        self.port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        return self

    def call(self, coro, timeout: float = 30):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float | None = 1.0) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
