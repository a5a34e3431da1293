"""The target <-> draft token channel: a real gRPC DraftServer on 127.0.0.1 in this process
hosting the draft, the target loop in the test thread."""
import time

import pytest
import torch

from mirror.decoding.drafters.base import DraftStats
from mirror.decoding.drafters.network import NetworkDrafter
from mirror.decoding.factory import generate
from mirror.decoding.messages import DraftWindow, EarlyExitSignal, Verdict
from mirror.decoding.target import TargetPipeline
from mirror.runtime.channel import (ChannelError, DraftChannelClient, DraftServer, model_draft_factory,
                                    sampling_from_proto, sampling_to_proto, signal_from_proto, signal_to_proto,
                                    spec_from_proto, spec_to_proto, window_from_proto, window_to_proto)
from mirror.proto.mirror.v1 import channel_pb2 as pb
from mirror.runtime.remote_generate import generate_remote
from mirror.sampling import SamplingParams
from mirror.spec_config import SpecConfig

PROMPTS = ["What is the capital of France? Answer in one sentence.",
           "Write a short poem about the sea.",
           "List three uses of a paperclip."]
PARAMS = SamplingParams(max_new_tokens=48, ignore_eos=True)
SPEC = SpecConfig(method="mirror", draft="ngram+self", draft_layers=2, gamma=4, kappa=4, budget=8, branch_batch=4)


def wait_until(cond, timeout=10.0):
    t0 = time.perf_counter()
    while not cond():
        assert time.perf_counter() - t0 < timeout, "timed out"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def draft_server(bundled):
    with DraftServer(model_draft_factory(bundled.model)) as srv:
        yield srv


def _remote(bundled, srv, ids, params, spec):
    with DraftChannelClient(srv.address, session_timeout=60) as client:
        target = TargetPipeline(bundled.model, params, spec)
        return generate_remote(target, client, bundled.tokenizer, ids, params, spec)


def test_greedy_mirror_through_the_channel_equals_plain_decoding(bundled, draft_server):
    for prompt in PROMPTS:
        ids = bundled.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        ref = generate(bundled.model, bundled.tokenizer, ids, PARAMS, SpecConfig(method="ar"))
        res = _remote(bundled, draft_server, ids, PARAMS, SPEC)
        assert res.ids == ref.ids and res.text == ref.text and res.finish_reason == "length"
        m = res.metrics
        # every verdict but the last got a window from the draft, counted there as hit or miss
        assert m.hits + m.misses == m.target_steps - 1 and m.target_steps > 0
        assert m.draft_tokens_computed > 0
        # pushed branches: hits whose window the target already held (no round trip); network
        # rollouts still running when the verdict is expected are not pushed (timing-dependent)
        assert m.extra.get("taken", 0) <= m.hits
        assert draft_server.servicer.sessions == {}


def test_pushed_branches_are_taken_and_decode_the_same(bundled, draft_server):
    """n-gram rollouts (dict probes) are done long before the verdict: every hit after the
    first step finds its window pushed; without pushing, the same tokens and hits."""
    from dataclasses import replace

    spec = SpecConfig(method="mirror", draft="ngram", gamma=4, kappa=4, budget=16)
    ids = bundled.tokenizer.encode_chat([{"role": "user", "content": PROMPTS[2]}])
    ref = generate(bundled.model, bundled.tokenizer, ids, PARAMS, SpecConfig(method="ar"))
    pushed = _remote(bundled, draft_server, ids, PARAMS, spec)
    plain = _remote(bundled, draft_server, ids, PARAMS, replace(spec, push_branches=False))
    assert pushed.ids == plain.ids == ref.ids
    m = pushed.metrics
    assert m.hits == plain.metrics.hits > 0
    assert 0 < m.extra["taken"] <= m.hits and "taken" not in plain.metrics.extra


def test_a_cut_suffix_through_the_channel_decodes_the_same(bundled, draft_server):
    """verify_cut over the channel: the signal carries the rows the target will verify, the
    draft ranks only hypotheses within them (and the cut token itself); output stays plain
    decoding's, cuts happen, and some were wrong (the target then commits the cut token)."""
    spec = SpecConfig(method="mirror", draft="ngram", gamma=4, kappa=4, budget=16, verify_cut=1)
    ids = bundled.tokenizer.encode_chat([{"role": "user", "content": PROMPTS[2]}])
    ref = generate(bundled.model, bundled.tokenizer, ids, PARAMS, SpecConfig(method="ar"))
    res = _remote(bundled, draft_server, ids, PARAMS, spec)
    assert res.ids == ref.ids
    m = res.metrics
    assert m.cut_steps > 0 and m.cut_tokens >= m.cut_steps and m.cut_wrong > 0
    assert m.hits + m.misses == m.target_steps - 1 and m.hits > 0


def test_pre_signal_rollouts_through_the_channel_are_lossless_and_counted(bundled, draft_server):
    """pre_budget over the channel: the draft expands its own hypotheses once a window is out
    (under the target's prefix), the signal's after them; output stays plain decoding's."""
    from dataclasses import replace

    spec = replace(SPEC, pre_budget=4)
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    ids = bundled.tokenizer.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    ref = generate(bundled.model, bundled.tokenizer, ids, params, SpecConfig(method="ar"))
    res = _remote(bundled, draft_server, ids, params, spec)
    assert res.ids == ref.ids
    m = res.metrics
    assert m.hits + m.misses == m.target_steps - 1
    assert m.extra["pre_branches"] > 0 and 0 <= m.extra["pre_hits"] <= m.hits
    assert draft_server.servicer.sessions == {}


def test_hits_answered_before_their_rollout_stops_decode_the_same(bundled, draft_server):
    """rollout_stop="reply" with the default's draft (n-gram else the target's own GGUF blocks,
    its most likely next window rolled out from the moment a window is sent): a hit's window
    goes back as soon as the verdict is read, before the draft's rollouts stop; the output stays
    plain decoding's and those hits are counted."""
    spec = SpecConfig(method="mirror", draft="ngram+model", draft_model="target", draft_quant="gguf",
                      combine_min=1.2, ngram_datastore="bundled", gamma=5, kappa=8, pre_budget=1, budget=1,
                      branch_batch=1, rollout_stop="reply", push_branches=False)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    for prompt in PROMPTS[:2]:
        ids = bundled.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        ref = generate(bundled.model, bundled.tokenizer, ids, params, SpecConfig(method="ar"))
        res = _remote(bundled, draft_server, ids, params, spec)
        assert res.ids == ref.ids
        m = res.metrics
        assert m.hits + m.misses == m.target_steps - 1
        assert 0 < m.extra["early"] <= m.hits
    assert draft_server.servicer.sessions == {}


@pytest.mark.parametrize("method", ["sd", "mirror"])
def test_the_default_draft_takes_the_targets_prompt_kv_and_decodes_the_same(bundled, draft_server, method,
                                                                             monkeypatch):
    """Open.prompt_kv with the default's draft (n-gram else the target's own GGUF blocks, which
    prefill long prompts through the model's fp32 graph): the draft takes the target's prompt
    K/V - into its cache exactly, with no prefill of its own - and the output stays plain
    decoding's."""
    from mirror.decoding.drafters.network import NetworkDrafter

    took, warmed = [], []
    adopt, warm = NetworkDrafter.adopt_kv, NetworkDrafter.warm

    def spy_adopt(self, prompt, k, v):
        ok = adopt(self, prompt, k, v)
        n = len(prompt)
        took.append(ok and torch.equal(self.cache.k[:, 0, :, :n], k) and torch.equal(self.cache.v[:, 0, :, :n], v))
        return ok

    monkeypatch.setattr(NetworkDrafter, "adopt_kv", spy_adopt)
    monkeypatch.setattr(NetworkDrafter, "warm", lambda self, prompt: warmed.append(len(prompt)) or warm(self, prompt))
    spec = SpecConfig(method=method, draft="ngram+model", draft_model="target", draft_quant="gguf", combine_min=1.2,
                      ngram_datastore="bundled", gamma=5, kappa=8, pre_budget=1 if method == "mirror" else 0,
                      budget=1, branch_batch=1, rollout_stop="verdict")
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    ids = bundled.tokenizer.encode_chat([{"role": "user", "content": " ".join(PROMPTS * 4)}])
    assert len(ids) >= 64  # PREFILL_MIN: a prompt the draft prefills through the fp32 graph
    from mirror.decoding.factory import prompt_kv_min
    assert prompt_kv_min(spec) == 64
    ref = generate(bundled.model, bundled.tokenizer, ids, params, SpecConfig(method="ar"))
    with DraftChannelClient(draft_server.address, session_timeout=120) as client:
        target = TargetPipeline(bundled.model, params, spec)
        res = generate_remote(target, client, bundled.tokenizer, ids, params, spec, prompt_kv=True)
    assert res.ids == ref.ids
    assert took == [True] and warmed == []
    assert res.metrics.draft_tokens_computed > 0
    assert draft_server.servicer.sessions == {}


def test_sampled_sd_through_the_channel_equals_in_process(bundled, draft_server):
    """Serial drafting consumes the draft's seeded generator the same way on both paths, so
    the sampled output (and the draft probabilities that crossed the channel) must match."""
    params = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True)
    spec = SpecConfig(method="sd", draft="self", draft_layers=2, gamma=3)
    ids = bundled.tokenizer.encode_chat([{"role": "user", "content": PROMPTS[1]}])
    ref = generate(bundled.model, bundled.tokenizer, ids, params, spec)
    res = _remote(bundled, draft_server, ids, params, spec)
    assert res.ids == ref.ids
    assert res.metrics.accepted_tokens == ref.metrics.accepted_tokens
    assert draft_server.servicer.sessions == {}


# --- channel semantics with a scripted draft -------------------------------------------------
class ScriptedDrafter:
    def __init__(self):
        self.closed = False
        self.stats = DraftStats()

    def totals(self):
        return DraftStats(computed=5, used=3, hits=1, misses=2, branches=4, by_source={"scripted": 3})

    def close(self):
        self.closed = True


class ScriptedPipeline:
    """Expands until told to stop; records the order of events and what it received."""

    def __init__(self, req):
        self.req, self.drafter, self.events, self.signals = req, ScriptedDrafter(), [], []

    def warm(self, prompt):
        self.events.append(("warm", tuple(prompt)))

    def start(self, ctx, gamma):
        self.events.append(("start", tuple(ctx), gamma))
        return DraftWindow([1] * gamma, source="scripted")

    def prepare(self, should_stop=None):
        self.events.append("prepare")

    def on_signal(self, signal, should_stop=None):
        self.signals.append(signal)
        self.events.append("expand")
        while not should_stop():
            time.sleep(0.001)
        self.events.append("expand stopped")
        return 0

    def on_verdict(self, verdict, gamma):
        self.events.append(("verdict", verdict.step, verdict.accepted, verdict.token, gamma))
        return DraftWindow([verdict.token] * gamma, source="scripted")


@pytest.fixture()
def scripted():
    pipelines = []

    def factory(req):
        if req.spec.draft == "ngram":
            raise ValueError("no n-gram drafts here")
        pipelines.append(ScriptedPipeline(req))
        return pipelines[-1]

    with DraftServer(factory) as srv:
        yield srv, pipelines


def _signal(step=0, G=3, kappa=4):
    top = torch.randn(G + 1, 100).log_softmax(-1).topk(kappa, -1)
    return EarlyExitSignal(step, top.indices, top.values)


def test_verdict_stops_the_expansion_then_answers(scripted):
    srv, pipelines = scripted
    with DraftChannelClient(srv.address, session_timeout=60) as client:
        w0 = client.open([5, 6, 7], 8, 3, SPEC, PARAMS, session_id="s1")
        assert w0.ids == [1, 1, 1] and w0.source == "scripted"
        p = pipelines[0]
        assert p.req.session_id == "s1" and p.req.spec == SPEC and p.req.params.max_new_tokens == 48
        assert set(srv.servicer.sessions) == {"s1"}
        sig = _signal()
        t0 = time.perf_counter()
        client.send_signal(sig)
        assert time.perf_counter() - t0 < 0.05, "send_signal blocked"
        wait_until(lambda: p.events[-1] == "expand")
        time.sleep(0.05)
        assert p.events[-1] == "expand", "the expansion stopped before the verdict"
        w1 = client.send_verdict(Verdict(0, 2, 42), gamma=2)
        assert w1.ids == [42, 42]
        # mirror: once a window is out the draft prepares its rollouts (before the signal's expansion)
        wait_until(lambda: p.events.count("prepare") == 2)
        assert p.events == [("start", (5, 6, 7, 8), 3), "prepare", "expand", "expand stopped",
                            ("verdict", 0, 2, 42, 2), "prepare"]
        got = p.signals[0]
        assert torch.equal(got.top_ids, sig.top_ids) and torch.equal(got.top_logprobs, sig.top_logprobs)
        # an sd-style step: a verdict with no signal before it
        assert client.send_verdict(Verdict(1, 0, 9), gamma=3).ids == [9, 9, 9]
        stats = client.close()
        assert stats == DraftStats(5, 3, 1, 2, 4, {"scripted": 3})
    assert srv.servicer.sessions == {} and p.drafter.closed


class BranchingDrafter(ScriptedDrafter):
    def __init__(self):
        super().__init__()
        self.branches = {}

    def ready(self):
        return dict(self.branches)


class BranchingPipeline(ScriptedPipeline):
    """Each signal's rollouts: one branch, (1, 9) -> [9, 10, 11], done at once; plus one with
    distributions, which is never pushed."""

    def __init__(self, req):
        super().__init__(req)
        self.drafter = BranchingDrafter()

    def on_signal(self, signal, should_stop=None):
        self.signals.append(signal)
        self.events.append("expand")
        self.drafter.branches = {(1, 9): DraftWindow([9, 10, 11], source="branch"),
                                 (0, 4): DraftWindow([4, 4], torch.full((2, 8), 0.125), "sampled")}
        return 1

    def on_verdict(self, verdict, gamma):
        self.events.append(("verdict", verdict.step, verdict.accepted, verdict.token, gamma))
        w = self.drafter.branches.get((verdict.accepted, verdict.token))
        self.drafter.branches = {}
        return w or DraftWindow([verdict.token] * gamma, source="scripted")


@pytest.mark.parametrize("push", [True, False])
def test_pushed_branches_answer_a_hit_without_a_round_trip(push):
    with DraftServer(lambda req: BranchingPipeline(req)) as srv:
        with DraftChannelClient(srv.address, session_timeout=60, reply_timeout=5) as client:
            client.open([5], 6, 3, SPEC, PARAMS, push_branches=push)
            (session,) = srv.servicer.sessions.values()
            p = session.pipeline

            def step(s, verdict):
                client.send_signal(_signal(s))
                wait_until(lambda: p.events.count("expand") == s + 1)
                time.sleep(0.05)  # the suffix: pushed branches reach the target's inbox meanwhile
                return client.send_verdict(verdict, gamma=3)

            # step 0: the draft has no signal -> verdict estimate yet, so nothing is pushed
            assert step(0, Verdict(0, 1, 9)).ids == [9, 10, 11] and client.taken == 0
            # step 1: a hit among the pushed branches is the target's at once
            w1 = step(1, Verdict(1, 1, 9))
            assert w1.ids == [9, 10, 11] and w1.source == "branch" and w1.probs is None
            assert client.taken == (1 if push else 0)
            wait_until(lambda: ("verdict", 1, 1, 9, 3) in p.events)  # the draft committed the hit too
            # a miss: answered by the draft; a stray window for step 1 would fail the step check
            assert step(2, Verdict(2, 0, 5)).ids == [5, 5, 5]
            # a branch with distributions is never pushed: (0, 4) comes back the slow way
            w3 = step(3, Verdict(3, 0, 4))
            assert w3.ids == [4, 4] and w3.probs is not None and client.taken == (1 if push else 0)
            assert client.close().taken == (1 if push else 0)
        wait_until(lambda: srv.servicer.sessions == {})


def test_a_verdict_taking_a_branch_never_pushed_is_refused():
    with DraftServer(lambda req: BranchingPipeline(req)) as srv:
        with DraftChannelClient(srv.address, session_timeout=60, reply_timeout=5) as client:
            client.open([5], 6, 3, SPEC, PARAMS, push_branches=True)
            client.send_signal(_signal(0))
            client._send(pb.TargetMessage(verdict=pb.Verdict(step=0, accepted=2, token=7, gamma=3, taken=True)))
            with pytest.raises(ChannelError, match=r"takes branch \(2, 7\), which was not pushed"):
                client._recv("window")
        wait_until(lambda: srv.servicer.sessions == {})


def test_a_deferred_open_prefills_first_and_answers_the_first_token(scripted):
    """Opened before the target's prefill: open returns at once, the draft warms up on the
    prompt, and the first token is answered with window 0; signals before it are refused."""
    srv, pipelines = scripted
    with DraftChannelClient(srv.address, session_timeout=60, reply_timeout=5) as client:
        assert client.open([5, 6, 7], None, 0, SPEC, PARAMS) is None
        wait_until(lambda: pipelines and pipelines[0].events == [("warm", (5, 6, 7))])
        w0 = client.first(8, 2)
        assert w0.ids == [1, 1]
        assert client.send_verdict(Verdict(0, 2, 9), gamma=3).ids == [9, 9, 9]
        client.close()
    assert pipelines[0].events[:3] == [("warm", (5, 6, 7)), ("start", (5, 6, 7, 8), 2), "prepare"]
    with DraftChannelClient(srv.address, session_timeout=60, reply_timeout=5) as client:
        client.open([5], None, 0, SPEC, PARAMS)
        client.send_signal(_signal())
        with pytest.raises(ChannelError, match="signal before the first token"):
            client.first(6, 3)
        client.open([5], 6, 3, SPEC, PARAMS)
        with pytest.raises(ChannelError, match="first token after the first window"):
            client.first(6, 3)
    wait_until(lambda: srv.servicer.sessions == {})


def test_a_warmed_network_draft_drafts_what_a_cold_one_does(bundled, draft_server):
    """The real draft behind a deferred open: the prompt's KV is written before the first token
    arrives (only the root is fed after it), and window 0 is the cold start's window."""
    ids = bundled.tokenizer.encode_chat([{"role": "user", "content": PROMPTS[2]}])
    spec = SpecConfig(method="sd", draft="self", draft_layers=4, gamma=5)
    with DraftChannelClient(draft_server.address, session_timeout=60) as client:
        cold = client.open(ids, 42, 5, spec, PARAMS)
        client.close()
        client.open(ids, None, 0, spec, PARAMS)
        wait_until(lambda: len(draft_server.servicer.sessions) == 1)
        (session,) = draft_server.servicer.sessions.values()
        wait_until(lambda: session.pipeline.drafter.kv == len(ids))
        assert not session.started
        warm = client.first(42, 5)
        assert session.pipeline.drafter.kv >= len(ids) + 1
        client.close()
    assert len(cold.ids) == 5 and warm.ids == cold.ids


class KvDrafter(ScriptedDrafter):
    """Takes the prompt's K/V when `takes` (records what it got)."""

    def __init__(self, takes: bool):
        super().__init__()
        self.takes, self.got = takes, None

    def adopt_kv(self, prompt, k, v):
        self.got = (list(prompt), k.clone(), v.clone())
        return self.takes


class _Cache:  # a KVCache's layout: k, v [layers, rows, kv_heads, positions, head_dim]
    def __init__(self, L=3, H=2, S=9, D=4):
        self.k, self.v = torch.randn(L, 1, H, S, D), torch.randn(L, 1, H, S, D)


@pytest.mark.parametrize("takes", [True, False])
def test_the_prompt_kv_replaces_the_drafts_prefill(takes):
    """Open.prompt_kv: the draft does not prefill while the target does; the target's prompt
    K/V arrive in slices (here one position each) and the drafter gets them whole and exact at
    First. A drafter that cannot take them prefills the prompt then, before window 0."""
    pipelines = []

    def factory(req):
        pipelines.append(ScriptedPipeline(req))
        pipelines[-1].drafter = KvDrafter(takes)
        return pipelines[-1]

    cache = _Cache()
    with DraftServer(factory) as srv:
        with DraftChannelClient(srv.address, session_timeout=60, reply_timeout=5) as client:
            client.KV_SLICE_BYTES = 2 * 4 * 4  # kv_heads * head_dim * 4 bytes: one position a slice
            assert client.open([5, 6, 7, 8], None, 0, SPEC, PARAMS, prompt_kv=True) is None
            sent = client.send_prompt_kv(cache, 4)
            assert sent == 2 * 3 * 2 * 4 * 4 * 4  # k and v, 3 layers, 2 heads, 4 positions, 4 dims
            assert client.first(9, 2).ids == [1, 1]
            client.close()
        wait_until(lambda: srv.servicer.sessions == {})
    (p,) = pipelines
    prompt, k, v = p.drafter.got
    assert prompt == [5, 6, 7, 8]
    assert torch.equal(k, cache.k[:, 0, :, :4]) and torch.equal(v, cache.v[:, 0, :, :4])
    warmed = [e for e in p.events if e[0] == "warm"]
    assert warmed == ([] if takes else [("warm", (5, 6, 7, 8))])
    assert p.events[len(warmed)] == ("start", (5, 6, 7, 8, 9), 2)


def test_malformed_or_unasked_prompt_kv_is_refused(scripted):
    srv, _ = scripted
    with DraftChannelClient(srv.address, session_timeout=60, reply_timeout=5) as client:
        with pytest.raises(ChannelError, match="prompt_kv needs a deferred open"):
            client.open([5, 6], 7, 2, SPEC, PARAMS, prompt_kv=True)
        client.open([5, 6], None, 0, SPEC, PARAMS)  # no prompt_kv: the draft prefills itself
        client.send_prompt_kv(_Cache(), 2)
        with pytest.raises(ChannelError, match="PromptKV without Open.prompt_kv"):
            client.first(7, 2)
        for bad in (dict(layers=1, start=1),  # positions past the prompt
                    dict(layers=0, start=0),  # layer 0 of none
                    dict(layers=2 ** 31 - 1, start=0)):  # 32 GiB of K/V announced
            client.open([5, 6], None, 0, SPEC, PARAMS, prompt_kv=True)
            client._send(pb.TargetMessage(kv=pb.PromptKV(layer=0, length=2, total=2, kv_heads=1, head_dim=1,
                                                         k=b"\0" * 8, v=b"\0" * 8, **bad)))
            with pytest.raises(ChannelError, match="malformed PromptKV"):
                client.first(7, 2)
    wait_until(lambda: srv.servicer.sessions == {})


class PreExpandingPipeline(ScriptedPipeline):
    """prepare() rolls out until told to stop, as pre-signal rollouts (pre_budget) may."""

    def prepare(self, should_stop=None):
        self.events.append("prepare")
        while not should_stop():
            time.sleep(0.001)
        self.events.append("prepare stopped")


def test_pre_signal_rollouts_neither_block_the_signal_nor_outlive_the_verdict():
    with DraftServer(lambda req: PreExpandingPipeline(req)) as srv:
        with DraftChannelClient(srv.address, session_timeout=60, reply_timeout=5) as client:
            client.open([5], 6, 3, SPEC, PARAMS)
            (p,) = [s.pipeline for s in srv.servicer.sessions.values()]
            wait_until(lambda: p.events[-1] == "prepare")
            client.send_signal(_signal(0))
            time.sleep(0.05)
            assert p.events[-1] == "prepare", "the signal stopped the pre-signal rollouts"
            t0 = time.perf_counter()
            assert client.send_verdict(Verdict(0, 1, 9), gamma=3).ids == [9, 9, 9]
            assert time.perf_counter() - t0 < 1.0
            assert p.events[1:5] == ["prepare", "prepare stopped", "expand", "expand stopped"]
            wait_until(lambda: p.events[-1] == "prepare")  # the next window's, running again
            client.close()


@pytest.mark.parametrize("policy", ["predict", "verdict"])
def test_a_predicted_verdict_ends_rollouts_before_it_arrives(scripted, policy):
    """rollout_stop="predict": having seen a verdict come ~0.1 s after its signal, the draft ends
    the next expansion about then, without waiting for a verdict that comes late (0.8 s);
    "verdict" expands until the verdict is there."""
    from dataclasses import replace

    srv, pipelines = scripted
    with DraftChannelClient(srv.address, session_timeout=60) as client:
        client.open([5], 6, 3, replace(SPEC, rollout_stop=policy), PARAMS)
        p = pipelines[0]
        client.send_signal(_signal(0))
        time.sleep(0.1)
        client.send_verdict(Verdict(0, 1, 9), gamma=3)
        client.send_signal(_signal(1))
        time.sleep(0.8)
        stopped_before_the_verdict = p.events[-1] == "expand stopped"
        client.send_verdict(Verdict(1, 1, 9), gamma=3)
        client.close()
    assert stopped_before_the_verdict == (policy == "predict")
    assert p.events.count("expand stopped") == 2


class FillingDrafter(ScriptedDrafter):
    def __init__(self):
        super().__init__()
        self._live = None

    rolling = NetworkDrafter.rolling  # (reads _live as NetworkDrafter keeps it)


class FillingPipeline(ScriptedPipeline):
    """Each signal's rollout: hypothesis (1, 9), one 80 ms draft step after another (at most 5),
    its window length readable while it runs (`rolling`)."""

    def __init__(self, req):
        super().__init__(req)
        self.drafter, self.stopped_at = FillingDrafter(), []

    def on_signal(self, signal, should_stop=None):
        lengths = torch.zeros(1, dtype=torch.long)
        self.drafter._live = ([(1, 9)], [], lengths)
        while True:
            time.sleep(0.08)
            lengths += 1
            if int(lengths[0]) >= 5 or should_stop():
                break
        self.stopped_at.append(int(lengths[0]))
        self.drafter._live = None
        return 1


@pytest.mark.parametrize("fill", [0, 3])
def test_a_filling_verdict_lets_its_own_rollout_reach_the_window_length(fill):
    """fill_window: a verdict whose hypothesis is being rolled out lets that rollout go on until
    its window holds fill_window tokens before the window is sent; a verdict for another
    hypothesis stops the rollout after the step under way, as without it."""
    from dataclasses import replace

    with DraftServer(lambda req: FillingPipeline(req)) as srv:
        with DraftChannelClient(srv.address, session_timeout=60) as client:
            client.open([5], 6, 3, replace(SPEC, rollout_stop="verdict", fill_window=fill), PARAMS)
            (p,) = [s.pipeline for s in srv.servicer.sessions.values()]
            client.send_signal(_signal(0))
            wait_until(lambda: p.drafter._live is not None and int(p.drafter._live[2][0]) >= 1)
            client.send_verdict(Verdict(0, 1, 9), gamma=3)  # the rollout's own hypothesis
            client.send_signal(_signal(1))
            wait_until(lambda: p.drafter._live is not None and int(p.drafter._live[2][0]) >= 1)
            client.send_verdict(Verdict(1, 0, 4), gamma=3)  # another one
            client.close()
    assert p.stopped_at[0] == 3 if fill else p.stopped_at[0] < 3
    assert p.stopped_at[1] < 3
    with pytest.raises(ValueError, match="fill_window"):
        replace(SPEC, fill_window=SPEC.gamma + 1)


def test_cancel_during_expansion_frees_the_session(scripted):
    srv, pipelines = scripted
    client = DraftChannelClient(srv.address, session_timeout=60)
    client.open([5], 6, 3, SPEC, PARAMS)
    client.send_signal(_signal())
    wait_until(lambda: pipelines and pipelines[0].events[-1] == "expand")
    client.cancel()
    wait_until(lambda: srv.servicer.sessions == {})
    wait_until(lambda: pipelines[0].events[-1] == "expand stopped")
    assert not client.is_open
    client.cancel()  # idempotent
    client.shutdown()


def test_target_vanishing_frees_the_session(scripted):
    srv, pipelines = scripted
    client = DraftChannelClient(srv.address, session_timeout=60)
    client.open([5], 6, 3, SPEC, PARAMS)
    client.send_signal(_signal())
    wait_until(lambda: len(srv.servicer.sessions) == 1 and pipelines[0].events[-1] == "expand")
    client.channel.close()  # no Close, no Cancel: the connection is just gone
    wait_until(lambda: srv.servicer.sessions == {})
    wait_until(lambda: pipelines[0].drafter.closed)


def test_draft_errors_reach_the_target(scripted):
    srv, _ = scripted
    from dataclasses import replace

    with DraftChannelClient(srv.address, session_timeout=60) as client:
        with pytest.raises(ChannelError, match="no n-gram drafts here"):
            client.open([5], 6, 3, replace(SPEC, draft="ngram"), PARAMS)
        assert not client.is_open
        client.open([5], 6, 3, SPEC, PARAMS)  # the client is reusable
        with pytest.raises(ChannelError, match="draft window for step 5, expected 4"):
            _stale_verdict(client)
    wait_until(lambda: srv.servicer.sessions == {})


def _stale_verdict(client):
    """A verdict whose window comes back for another step than the client expects."""
    from mirror.proto.mirror.v1 import channel_pb2 as pb

    client._send(pb.TargetMessage(verdict=pb.Verdict(step=4, accepted=0, token=1, gamma=3)))
    return client._window(4)


# --- conversions -------------------------------------------------------------------------------
def test_messages_survive_the_wire():
    spec = SpecConfig(method="sd", draft="model", draft_model="/m", confidence=0.3, gamma=7, exit_layer=12,
                      rollout_stop="verdict")
    assert spec_from_proto(spec_to_proto(spec)) == spec
    stop = SpecConfig(method="mirror", draft="ngram", ngram_datastore="bundled", window_stop="/w.json")
    assert spec_from_proto(spec_to_proto(stop)).window_stop == "/w.json"
    q = SpecConfig(method="mirror", draft="model", draft_model="target", draft_quant="int8", int8_calib="bundled")
    assert spec_from_proto(spec_to_proto(q)) == q
    c = SpecConfig(method="mirror", draft="ngram+model", draft_model="target", draft_quant="int8", combine_min=1.25)
    assert spec_from_proto(spec_to_proto(c)) == c
    assert spec_from_proto(spec_to_proto(SPEC)) == SPEC
    own = SpecConfig(method="sd", draft="model", draft_model="target", draft_quant="gguf", draft_prefill="draft")
    assert spec_from_proto(spec_to_proto(own)).draft_prefill == "draft"
    old_peer = spec_to_proto(own)
    old_peer.ClearField("draft_prefill")  # a peer from before the field: the default
    assert spec_from_proto(old_peer).draft_prefill == "auto"
    params = SamplingParams(max_new_tokens=9, temperature=0.7, top_k=5, top_p=0.9, seed=3)
    back = sampling_from_proto(sampling_to_proto(params))
    assert (back.temperature, back.top_k, back.top_p, back.seed, back.max_new_tokens) == (0.7, 5, 0.9, 3, 9)
    assert sampling_from_proto(sampling_to_proto(PARAMS)).seed is None
    sig = _signal(step=3, G=5, kappa=8)
    got = signal_from_proto(signal_to_proto(sig))
    assert got.step == 3 and got.top_ids.shape == (6, 8)
    assert torch.equal(got.top_ids, sig.top_ids) and torch.equal(got.top_logprobs, sig.top_logprobs)
    assert got.rows == 0
    sig.rows = 3  # a verify_cut suffix's rows
    assert signal_from_proto(signal_to_proto(sig)).rows == 3
    probs = torch.rand(4, 50).softmax(-1)
    w = window_from_proto(window_to_proto(DraftWindow([1, 2, 3, 4], probs, "net"), step=2))
    assert w.ids == [1, 2, 3, 4] and w.source == "net" and torch.equal(w.probs, probs)
    assert window_from_proto(window_to_proto(DraftWindow([]), step=0)).probs is None


class StallingPipeline(ScriptedPipeline):
    """Drafts nothing useful and, at its second verdict, stalls far past the reply deadline."""

    def on_verdict(self, verdict, gamma):
        self.events.append(("verdict", verdict.step))
        if sum(isinstance(e, tuple) and e[0] == "verdict" for e in self.events) == 2:
            time.sleep(2.0)
        return DraftWindow([7] * gamma, source="scripted")


@pytest.mark.parametrize("method", ["sd", "mirror"])
def test_a_draft_stalled_past_the_deadline_degrades_to_target_only_with_the_same_tokens(bundled, method):
    """Issue 5's degradation: a draft reply later than `reply_timeout` (the deployment's
    `draft.deadline_ms`) ends the draft's part; the target finishes alone, same tokens."""
    from mirror.decoding.speculative import generate_speculative
    from mirror.runtime.workers import DegradingDraftPipeline

    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    spec = SpecConfig(method=method, draft="self", draft_layers=2, gamma=3, kappa=2, budget=2)
    ids = bundled.tokenizer.encode_chat([{"role": "user", "content": PROMPTS[2]}])
    ref = generate(bundled.model, bundled.tokenizer, ids, params)
    with DraftServer(lambda req: StallingPipeline(req)) as srv:
        draft = DegradingDraftPipeline(lambda: DraftChannelClient(srv.address, reply_timeout=0.5), spec, params)
        t0 = time.perf_counter()
        with torch.inference_mode():
            res = generate_speculative(TargetPipeline(bundled.model, params, spec), draft, bundled.tokenizer,
                                       ids, params, spec)
        elapsed = time.perf_counter() - t0
        draft.release()
    assert res.ids == ref.ids and res.finish_reason == "length"
    assert draft.degraded is not None and "stalled" in draft.degraded
    assert elapsed < 20  # one deadline's wait, not a hang
