"""A Python client for a mirror-sd server (`mirror serve`); needs neither torch nor a model.

    with GenerateClient("127.0.0.1:50051") as client:
        for chunk in client.stream("Write a haiku", max_tokens=64):
            print(chunk.text, end="", flush=True)
        result = client.generate("Hi", temperature=0.7, seed=1)
        print(result.text, result.usage.tokens_per_s)

`stream()` returns a `Stream`: iterate it for Chunks (the last one has finish_reason and
usage) and call `cancel()` from any thread to stop the server's decoding of that request.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from .engine import Chunk, Usage
from .proto.mirror.v1 import generate_pb2, generate_pb2_grpc

FINISH_REASON = {generate_pb2.STOP: "stop", generate_pb2.LENGTH: "length",
                 generate_pb2.CANCELLED: "cancelled", generate_pb2.ERROR: "error"}
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "method", "request_id", "raw")


class GenerateError(Exception):
    """The server refused or failed a request: `code` is the gRPC status, `message` its details."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


@dataclass(slots=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    method: str = ""
    error: str = ""
    chunks: int = 0  # messages received (> 1 when the output was streamed)


def chunk_from_proto(msg: generate_pb2.GenerateResponse) -> Chunk:
    chunk = Chunk(msg.text, list(msg.token_ids))
    if msg.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED:
        chunk.finish_reason = FINISH_REASON[msg.finish_reason]
        chunk.error, chunk.method = msg.error, msg.method
        if msg.HasField("usage"):
            u = msg.usage
            chunk.usage = Usage(u.prompt_tokens, u.completion_tokens, u.tau, u.acceptance_rate, u.hit_rate,
                                u.prefill_ms, u.decode_ms, u.tokens_per_s)
    return chunk


def build_request(prompt: str | None = None, messages: list[dict] | None = None,
                  **params) -> generate_pb2.GenerateRequest:
    """A GenerateRequest from a prompt or a list of {"role", "content"} dicts and sampling
    keywords (max_tokens, temperature, top_k, top_p, seed, stop, stop_token_ids, ignore_eos,
    method, request_id, raw). None values are left unset (server defaults)."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt and messages")
    unknown = set(params) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown request fields: {', '.join(sorted(unknown))}")
    req = generate_pb2.GenerateRequest(**{k: v for k, v in params.items() if v is not None})
    if prompt is not None:
        req.prompt = prompt
    else:
        req.messages.messages.extend(generate_pb2.ChatMessage(role=m["role"], content=m["content"])
                                     for m in messages)
    return req


class Stream:
    """One streaming call: an iterator of Chunks with `cancel()`."""

    def __init__(self, call):
        self._call = call
        self.cancelled = False

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for msg in self._call:
                yield chunk_from_proto(msg)
        except grpc.RpcError as e:
            if self.cancelled and e.code() == grpc.StatusCode.CANCELLED:
                return
            raise GenerateError(e.code(), e.details() or "") from None

    def cancel(self) -> None:
        """Stop the request; the server stops decoding it at its next step."""
        self.cancelled = True
        self._call.cancel()


class GenerateClient:
    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = None,
                 max_message_mb: int = 64):
        self.target, self.timeout = target, timeout
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", max_message_mb << 20)])
        self.stub = generate_pb2_grpc.GenerateStub(self.channel)

    def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None, **params) -> Stream:
        req = build_request(prompt, messages, **params)
        return Stream(self.stub.Generate(req, timeout=self.timeout))

    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                 **params) -> Completion:
        """The whole output at once (still streamed underneath)."""
        text, ids, n, last = [], [], 0, None
        for chunk in self.stream(prompt, messages=messages, **params):
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
            n += 1
            if chunk.finish_reason is not None:
                last = chunk
        if last is None:
            raise GenerateError(grpc.StatusCode.UNKNOWN, "the stream ended without a final message")
        return Completion("".join(text), ids, last.finish_reason, last.usage or Usage(), last.method,
                          last.error, n)

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """The server's health status name (SERVING, NOT_SERVING, ...)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "GenerateClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
