"""The distributed runtime on the embedded default: Ray actors pinned to their own cores, the
gRPC token channel, the Generate server - against plain decoding of the real bundled model."""
import asyncio
import time

import grpc
import pytest
import ray

from mirror.client import GenerateClient, GenerateError
from mirror.decoding.ar import generate_ar
from mirror.engine import GenerateArgs
from mirror.runtime.cluster import DistributedEngine
from mirror.runtime.config import DeploymentConfig
from mirror.sampling import SamplingParams
from mirror.server import BackgroundServer
from mirror.spec_config import SpecConfig

PROMPT = "Write a short paragraph about the history of the bicycle."


# Starts Ray (or torch.distributed) and pins workers to cores: these tests share one pytest-xdist
# worker (see conftest.py), so two of them never run at once.
pytestmark = pytest.mark.xdist_group("ray")


@pytest.fixture(scope="module")
def engine():
    eng = DistributedEngine(DeploymentConfig.local())
    yield eng
    eng.runtime.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(bundled, local_target):
    """Plain decoding on the target as the embedded deployment runs it (target.backend auto)."""
    ids = bundled.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    return ids, generate_ar(local_target, bundled.tokenizer, ids, SamplingParams(max_new_tokens=48, ignore_eos=True)).ids


def run(engine, args, cancel_after=None, on_chunk=None):
    async def go():
        cancel = asyncio.Event()
        ids, last = [], None
        async for c in engine.generate(args, cancel):
            ids += c.token_ids
            if on_chunk:
                on_chunk(len(ids))
            if cancel_after is not None and len(ids) >= cancel_after:
                cancel.set()
            if c.finish_reason:
                last = c
        return ids, last
    return asyncio.run(go())


def test_workers_are_placed_and_pinned_on_separate_cores(engine):
    info = engine.runtime.info()
    t, d = info["target"][0], info["draft"]
    assert t["placement"]["cores"] == [0] and d["placement"]["cores"] == [1]
    assert t["pid"] != d["pid"]
    assert t["placement"]["threads"] == 1 and d["placement"]["threads"] == 1
    assert t["prefill_threads"] == 2  # target.prefill_cores [0, 1]: prompts prefill on both cores
    assert t["prefill_attention"] == "fused"  # through GroupQueryAttention


@pytest.mark.parametrize("method", ["mirror", "sd"])
def test_grpc_server_and_client_stream_the_plain_decoding_tokens(server, reference, method):
    ids, ref = reference
    with GenerateClient(server.address) as client:
        out = client.generate(PROMPT, max_tokens=48, ignore_eos=True, method=method)
    assert out.token_ids == ref
    assert out.finish_reason == "length" and out.usage.completion_tokens == 48
    assert out.usage.tau >= 1.0


def test_invalid_requests_get_invalid_argument_and_the_server_stays_healthy(server):
    bad = [dict(prompt=""), dict(prompt="hi", max_tokens=0), dict(prompt="hi", max_tokens=10 ** 6),
           dict(prompt="hi", temperature=-1.0), dict(prompt="hi", temperature=float("nan")),
           dict(prompt="hi", method="beam")]
    with GenerateClient(server.address) as client:
        for kw in bad:
            with pytest.raises(GenerateError) as e:
                client.generate(**kw)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.message
        assert client.health() == "SERVING"
        assert client.generate("Say hi.", max_tokens=4).finish_reason in ("stop", "length")


def test_cancel_mid_stream_frees_the_session_on_both_workers(engine):
    args = GenerateArgs(engine.tokenizer.encode_chat([{"role": "user", "content": PROMPT}]),
                        SamplingParams(max_new_tokens=200, ignore_eos=True), SpecConfig(method="mirror", draft="ngram"))
    ids, last = run(engine, args, cancel_after=8)
    assert last.finish_reason == "cancelled" and len(ids) < 200
    deadline = time.time() + 20
    while time.time() < deadline:
        info = engine.runtime.info()
        if info["target"][0]["sessions"] == 0 and info["draft"]["sessions"] == 0:
            break
        time.sleep(0.2)
    assert info["target"][0]["sessions"] == 0 and info["draft"]["sessions"] == 0


def test_the_draft_prefills_the_prompt_while_the_target_does(engine, bundled, local_target):
    """The session opens before the target's prefill: in the trace the draft worker's prompt
    prefill (draft.warm) runs during the target worker's (target.start), and the output is
    still plain decoding's."""
    text = " ".join([PROMPT] * 12)  # a long prompt: a prefill that lasts
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": text}])
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ref = generate_ar(local_target, bundled.tokenizer, ids, params).ids
    args = GenerateArgs(ids, params, SpecConfig(method="sd", draft="self", draft_layers=4, gamma=4))
    run(engine, args)  # builds the draft network on the draft worker
    origin = engine.runtime.start_trace()
    out, last = run(engine, args)
    events = engine.runtime.stop_trace(origin).events
    assert out == ref and last.finish_reason == "length" and not engine.completed[-1]["degraded"]
    (warm,) = [e for e in events if e["name"] == "draft.warm"]
    (prefill,) = [e for e in events if e["name"] == "target.start"]
    assert warm["pid"] != prefill["pid"]
    assert warm["ts"] < prefill["ts"] + prefill["dur"] and prefill["ts"] < warm["ts"] + warm["dur"]


def test_the_default_draft_takes_the_targets_prompt_kv_after_its_prefill_on_both_cores(engine, bundled,
                                                                                       local_target):
    """The embedded default with a long prompt: the target worker prefills on both cores, then
    sends the prompt's K/V; the draft worker takes them (draft.take_kv) instead of prefilling
    (no draft.warm), and the output is still plain decoding's."""
    text = " ".join([PROMPT] * 12)
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": text}])
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ref = generate_ar(local_target, bundled.tokenizer, ids, params).ids
    args = GenerateArgs(ids, params, DeploymentConfig.local().speculative)
    run(engine, args)  # builds the draft's graph on the draft worker
    origin = engine.runtime.start_trace()
    out, last = run(engine, args)
    events = engine.runtime.stop_trace(origin).events
    assert out == ref and last.finish_reason == "length" and not engine.completed[-1]["degraded"]
    names = [e["name"] for e in events]
    assert "draft.warm" not in names
    (sent,) = [e for e in events if e["name"] == "channel.send_prompt_kv"]
    (took,) = [e for e in events if e["name"] == "draft.take_kv"]
    (prefill,) = [e for e in events if e["name"] == "target.start"]
    assert took["pid"] != prefill["pid"] == sent["pid"]
    assert prefill["ts"] + prefill["dur"] <= sent["ts"] <= took["ts"]


def test_killing_the_draft_mid_request_still_completes_exactly(engine, reference):
    ids, ref = reference
    spec = SpecConfig(method="mirror", draft="self", draft_layers=2, kappa=4, budget=4)
    args = GenerateArgs(ids, SamplingParams(max_new_tokens=48, ignore_eos=True), spec)
    killed = []

    def kill_once(n):
        if n >= 6 and not killed:
            ray.kill(engine.runtime.draft, no_restart=False)  # Ray restarts it in the background
            killed.append(n)

    out, last = run(engine, args, on_chunk=kill_once)
    assert killed and out == ref and last.finish_reason == "length"
    assert engine.completed[-1]["degraded"]  # the target noticed and finished alone
    # the draft comes back and serves later requests
    deadline = time.time() + 90
    while time.time() < deadline:
        out2, last2 = run(engine, GenerateArgs(ids, SamplingParams(max_new_tokens=16, ignore_eos=True),
                                                SpecConfig(method="mirror", draft="ngram")))
        if not engine.completed[-1]["degraded"]:
            break
        time.sleep(2)
    assert not engine.completed[-1]["degraded"] and out2 == ref[:16]
