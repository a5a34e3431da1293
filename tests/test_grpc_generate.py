"""The gRPC Generate service end to end: a real grpc.aio server on 127.0.0.1 (ephemeral port)
over LocalEngine and the bundled model, and the real client."""
import math
import time

import grpc
import pytest

from mirror.client import GenerateClient, GenerateError
from mirror.decoding.factory import generate
from mirror.engine import Chunk, Engine, LocalEngine, validate_request
from mirror.proto.mirror.v1 import generate_pb2
from mirror.sampling import SamplingParams
from mirror.server import BackgroundServer
from mirror.spec_config import SpecConfig

PROMPT = "Explain in two sentences why the sky is blue."
N = 32
# Requests that name no method run ar; "sd"/"mirror" requests use these (cheap) draft settings.
SPEC = SpecConfig(method="ar", draft="ngram+self", draft_layers=2, gamma=3, kappa=2, budget=2, branch_batch=2)


@pytest.fixture(scope="module")
def engine(bundled):
    return LocalEngine(bundled.model, bundled.tokenizer, SPEC)


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with GenerateClient(server.address, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference(bundled):
    ids = bundled.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    res = generate(bundled.model, bundled.tokenizer, ids, SamplingParams(max_new_tokens=N, ignore_eos=True))
    assert len(res.ids) == N
    return ids, res


@pytest.mark.parametrize("method", ["ar", "mirror"])
def test_stream_equals_plain_greedy_decoding(client, reference, method):
    prompt_ids, ref = reference
    chunks = list(client.stream(PROMPT, max_tokens=N, ignore_eos=True, method=method, request_id="r1"))
    assert len(chunks) > 2, "the output was not streamed"
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last.finish_reason == "length" and last.method == method
    assert [i for c in chunks for i in c.token_ids] == ref.ids
    assert "".join(c.text for c in chunks) == ref.text
    u = last.usage
    assert u.prompt_tokens == len(prompt_ids) and u.completion_tokens == N
    assert u.decode_ms > 0 and u.tokens_per_s > 0 and u.prefill_ms > 0
    assert u.tau >= 1.0
    if method == "mirror":
        assert 0.0 <= u.hit_rate <= 1.0


def test_generate_returns_the_whole_result(client, reference):
    _, ref = reference
    res = client.generate(PROMPT, max_tokens=N, ignore_eos=True)
    assert res.token_ids == ref.ids and res.text == ref.text and res.finish_reason == "length"
    assert res.usage.completion_tokens == N and res.chunks > 2


def test_messages_and_stop_string(client, bundled):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count from 1 to 9."}]
    full = client.generate(messages=msgs, max_tokens=24)
    ids = bundled.tokenizer.encode_chat(msgs)
    ref = generate(bundled.model, bundled.tokenizer, ids, SamplingParams(max_new_tokens=24))
    assert full.token_ids == ref.ids and full.usage.prompt_tokens == len(ids)
    stop = full.text[len(full.text) // 2:][:2]
    cut = client.generate(messages=msgs, max_tokens=24, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]


def test_concurrent_requests_are_served_one_after_another(client, reference):
    from concurrent.futures import ThreadPoolExecutor

    _, ref = reference
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda i: client.generate(PROMPT, max_tokens=8, ignore_eos=True), range(3)))
    assert all(r.token_ids == ref.ids[:8] for r in results)


INVALID = {
    "empty prompt": (dict(prompt="  "), "prompt is empty"),
    "no input": (dict(), "no input"),
    "max_tokens 0": (dict(prompt="Hi", max_tokens=0), "max_tokens must be a positive integer"),
    "beyond context": (dict(prompt="Hi", max_tokens=10**6), "exceeds the model's context"),
    "temperature -1": (dict(prompt="Hi", temperature=-1.0), "temperature must be"),
    "temperature nan": (dict(prompt="Hi", temperature=math.nan), "temperature must be"),
    "unknown method": (dict(prompt="Hi", method="beam"), "unknown method 'beam'"),
    "top_p 0": (dict(prompt="Hi", top_p=0.0), "top_p must be in (0, 1]"),
    "empty stop": (dict(prompt="Hi", stop=[""]), "stop strings must be non-empty"),
    "stop token id": (dict(prompt="Hi", stop_token_ids=[10**7]), "stop_token_ids"),
    "unknown role": (dict(messages=generate_pb2.ChatMessages(
        messages=[generate_pb2.ChatMessage(role="robot", content="x")])), "unknown role 'robot'"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_request_is_rejected_and_server_keeps_serving(client, engine, case):
    fields, message = INVALID[case]
    served = len(engine.completed)
    with pytest.raises(GenerateError) as e:
        list(_raw_stream(client, generate_pb2.GenerateRequest(**fields)))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.message
    assert len(engine.completed) == served, "an invalid request reached the engine"
    assert client.health() == "SERVING"
    assert client.health("mirror.v1.Generate") == "SERVING"
    ok = client.generate("Say hi", max_tokens=3, ignore_eos=True)
    assert ok.finish_reason == "length" and len(ok.token_ids) == 3


def _raw_stream(client, request):
    """The proto as built, so nothing is checked on the client side."""
    from mirror.client import Stream

    return Stream(client.stub.Generate(request, timeout=30))


def test_cancel_mid_stream_stops_the_engine(client, engine):
    stream = client.stream("Write a very long story about a dragon.", max_tokens=2000, ignore_eos=True,
                           request_id="to-cancel")
    got = 0
    for chunk in stream:
        got += len(chunk.token_ids)
        if got >= 3:
            stream.cancel()
            break
    t0 = time.perf_counter()
    while not (engine.completed and engine.completed[-1].request_id == "to-cancel") or engine.busy:
        assert time.perf_counter() - t0 < 10, "the engine did not stop after the client cancelled"
        time.sleep(0.01)
    done = engine.completed[-1]
    assert done.finish_reason == "cancelled"
    assert done.completion_tokens < 100  # it stopped promptly, far before max_tokens
    res = client.generate("Say hi", max_tokens=4, ignore_eos=True, request_id="after")
    assert res.finish_reason == "length" and len(res.token_ids) == 4
    assert engine.completed[-1].request_id == "after"


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.address) as ch:
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"mirror.v1.Generate", "grpc.health.v1.Health"} <= services


def test_validate_request_messages_use_the_chat_template(bundled):
    req = generate_pb2.GenerateRequest(max_tokens=5)
    req.messages.messages.add(role="user", content="Hello")
    args = validate_request(req, bundled.tokenizer, 8192, SPEC)
    assert args.prompt_ids == bundled.tokenizer.encode_chat([{"role": "user", "content": "Hello"}])
    assert args.params.max_new_tokens == 5 and args.params.greedy and args.spec.method == "ar"
    req = generate_pb2.GenerateRequest(prompt="Hello", raw=True, method="mirror", temperature=0.5, seed=3)
    args = validate_request(req, bundled.tokenizer, 8192, SPEC)
    assert args.prompt_ids == bundled.tokenizer.encode("Hello")
    assert args.spec.method == "mirror" and args.spec.gamma == SPEC.gamma and args.params.seed == 3
    assert args.params.max_new_tokens == 256  # the default when max_tokens is unset


# --- failures inside an engine -----------------------------------------------------------------
class FailingEngine(LocalEngine):
    """LocalEngine whose decoding emits one chunk, then fails."""

    def _run(self, args, on_chunk, should_stop):
        on_chunk("partial", [1, 2])
        raise RuntimeError("the accelerator fell off")


class BrokenEngine(Engine):
    """Breaks the Engine contract by raising out of generate()."""

    def __init__(self, tokenizer):
        self.tokenizer, self.context_len, self.default_spec = tokenizer, 8192, SPEC

    async def generate(self, args, cancel):
        yield Chunk("x", [1])
        raise KeyError("bug")


def test_engine_failure_ends_the_stream_with_error(bundled):
    eng = FailingEngine(bundled.model, bundled.tokenizer, SPEC)
    with BackgroundServer(eng) as srv, GenerateClient(srv.address, timeout=30) as c:
        chunks = list(c.stream("Hi", max_tokens=4))
        assert chunks[0].text == "partial" and chunks[0].token_ids == [1, 2]
        assert chunks[-1].finish_reason == "error" and "accelerator fell off" in chunks[-1].error
        assert chunks[-1].usage.completion_tokens == 2
        assert c.health() == "SERVING"
        assert eng.completed[-1].finish_reason == "error" and not eng.busy


def test_contract_breaking_engine_gives_internal_and_server_survives(bundled):
    with BackgroundServer(BrokenEngine(bundled.tokenizer)) as srv, GenerateClient(srv.address, timeout=30) as c:
        for _ in range(2):
            with pytest.raises(GenerateError) as e:
                list(c.stream("Hi", max_tokens=4))
            assert e.value.code == grpc.StatusCode.INTERNAL and "bug" in e.value.message
        assert c.health() == "SERVING"


# --- the CLI client ----------------------------------------------------------------------------
def test_cli_client_streams_and_prints_stats(server, reference, capsys):
    from mirror.cli import main

    _, ref = reference
    assert main(["client", PROMPT, "--server", server.address, "--max-tokens", str(N), "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    assert out == ref.text + "\n"
    assert f"{N} new tokens" in err and "tok/s" in err and "finish: length" in err


def test_cli_client_invalid_request_exits_nonzero(server, capsys):
    from mirror.cli import main

    with pytest.raises(SystemExit) as e:
        main(["client", "Hi", "--server", server.address, "--temperature", "-1"])
    assert e.value.code == 2
    assert "invalid request: temperature must be" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["client", "Hi", "--server", "127.0.0.1:1", "--timeout", "5"])
    assert e.value.code == 1
    assert "cannot reach a mirror server" in capsys.readouterr().err


def test_validate_request_context_limits(bundled):
    tok = bundled.tokenizer
    n = len(tok.encode("one two three"))
    req = generate_pb2.GenerateRequest(prompt="one two three", raw=True)
    assert validate_request(req, tok, n + 10, SPEC).params.max_new_tokens == 10  # default capped to the room
    req.max_tokens = 10
    assert validate_request(req, tok, n + 10, SPEC).params.max_new_tokens == 10
    req.max_tokens = 11
    with pytest.raises(ValueError, match=r"max_tokens \(11\) exceeds the model's context"):
        validate_request(req, tok, n + 10, SPEC)
    req.method = "mirror"  # the target's KV also holds a window of gamma + 1
    req.max_tokens = 10 - SPEC.gamma - 1
    assert validate_request(req, tok, n + 10, SPEC).spec.method == "mirror"
    req.max_tokens += 1
    with pytest.raises(ValueError, match="draft window"):
        validate_request(req, tok, n + 10, SPEC)
    with pytest.raises(ValueError, match="leaves no room"):
        validate_request(generate_pb2.GenerateRequest(prompt="one two three", raw=True), tok, n, SPEC)


def test_serve_without_config_uses_the_embedded_defaults(bundled, local_target, monkeypatch):
    """`mirror serve` in one process: requests that name nothing get deploy/local.yaml's
    speculative settings (not bare SpecConfig defaults, whose untrained self-draft made Mirror-SD
    requests ~13x slower) and the target on the default backend; flags override both."""
    import argparse

    import torch

    import mirror.models
    from mirror.runtime.config import DeploymentConfig
    from mirror.serve import add_serve_args, build_engine

    monkeypatch.setattr(mirror.models, "load_model", lambda *a, **k: bundled)
    p = argparse.ArgumentParser()
    add_serve_args(p)
    threads = torch.get_num_threads()
    try:
        eng = build_engine(p.parse_args([]))
        assert eng.default_spec == DeploymentConfig.local().speculative
        assert getattr(eng.model, "backend", "torch") == getattr(local_target, "backend", "torch")
        eng2 = build_engine(p.parse_args(["--method", "sd", "--gamma", "3", "--target-backend", "torch"]))
        assert (eng2.default_spec.method, eng2.default_spec.gamma) == ("sd", 3)
        assert eng2.default_spec.ngram_datastore == "bundled" and eng2.model is bundled.model
    finally:
        torch.set_num_threads(threads)
