"""Lossless speculative decoding: sd and mirror reproduce plain greedy decoding for every draft."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import byte_tokenizer, tiny_model
from mirror.decoding.drafters.network import DraftNet, NetworkDrafter
from mirror.decoding.factory import build_drafter, generate
from mirror.decoding.messages import DraftWindow, EarlyExitSignal, Verdict
from mirror.decoding.speculative import DraftPipeline
from mirror.decoding.target import TargetPipeline
from mirror.models import save_hf
from mirror.sampling import SamplingParams
from mirror.spec_config import DRAFTS, SpecConfig

TOK = byte_tokenizer()
TARGETS = {s: tiny_model("tiny", seed=s) for s in range(3)}


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A separate small model (different weights, same vocabulary) as a Hugging Face folder."""
    d = tmp_path_factory.mktemp("draft")
    save_hf(tiny_model("tiny", seed=99, n_layers=2), str(d))
    return str(d)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2), prompt=st.lists(st.integers(1, 255), min_size=4, max_size=24),
       method=st.sampled_from(["sd", "mirror"]), draft=st.sampled_from(DRAFTS),
       gamma=st.integers(1, 6), kappa=st.integers(1, 8), exit_layer=st.integers(1, 3),
       budget=st.integers(1, 16), confidence=st.sampled_from([0.0, 0.05, 0.3]),
       k=st.integers(1, 3), streams=st.integers(1, 3), pre_budget=st.sampled_from([0, 0, 3, 8]),
       combine_min=st.sampled_from([0.0, 0.0, 0.8, 1.5]), verify_cut=st.sampled_from([0, 0, 1, 2, 8]),
       catch_up=st.sampled_from(["whole", "lazy"]))
def test_greedy_speculative_equals_plain_decoding(draft_dir, seed, prompt, method, draft, gamma, kappa,
                                                  exit_layer, budget, confidence, k, streams, pre_budget,
                                                  combine_min, verify_cut, catch_up):
    target = TARGETS[seed]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    ref = generate(target, TOK, prompt, params)
    spec = SpecConfig(method=method, draft=draft, gamma=gamma, kappa=kappa, exit_layer=exit_layer,
                      budget=budget, confidence=confidence, draft_layers=k, streams=streams,
                      draft_model=draft_dir if "model" in draft else None, pre_budget=pre_budget,
                      combine_min=min(combine_min, gamma) if draft.startswith("ngram+") else 0.0,
                      verify_cut=min(verify_cut, kappa), catch_up=catch_up)
    res = generate(target, TOK, prompt, params, spec)
    assert res.ids == ref.ids
    assert res.metrics.committed + 1 >= len(res.ids)  # prefill gives 1, every other token a verified step


@pytest.mark.parametrize("method", ["sd", "mirror"])
def test_draft_equal_to_target_accepts_every_token(tmp_path, method):
    target = TARGETS[0]
    save_hf(target, str(tmp_path))
    spec = SpecConfig(method=method, draft="model", draft_model=str(tmp_path), gamma=4, kappa=8,
                      exit_layer=3, budget=16)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    res = generate(target, TOK, [5, 6, 7, 8], params, spec)
    assert res.ids == generate(target, TOK, [5, 6, 7, 8], params).ids
    m = res.metrics
    assert m.acceptance_rate == 1.0 and m.tau > 4.5  # gamma + 1 = 5 but for the shorter last window


def _pipelines(target, draft_net, spec, prompt, params):
    tp = TargetPipeline(target, params, spec)
    drafter = NetworkDrafter(draft_net, params, target.cfg.vocab_size, 128, max_rows=spec.budget,
                             gamma_max=spec.gamma)
    dp = DraftPipeline(drafter, spec)
    root = tp.start(prompt)
    window = dp.start(prompt + [root], spec.gamma)
    return tp, dp, drafter, root, window


def test_mirror_hit_and_miss_paths_are_both_taken():
    """A constructed case: kappa=1/budget=1 makes misses likely, an exit near the top makes hits
    likely; over a run both happen, are counted, and output stays exact."""
    target = TARGETS[1]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    ref = generate(target, TOK, prompt, params).ids
    spec = SpecConfig(method="mirror", draft="self", draft_layers=2, exit_layer=3, kappa=2, budget=2, gamma=3)
    res = generate(target, TOK, prompt, params, spec)
    assert res.ids == ref
    m = res.metrics
    assert m.hits > 0 and m.misses > 0
    assert m.hits + m.misses == m.target_steps - 1  # every verdict but the last is a hit or a miss


def test_hit_window_equals_serial_draft_from_the_same_context():
    """The shared-prefix branch rollout must propose what serial drafting would: force a hit on
    a chosen hypothesis (j, v) and compare with a fresh drafter run on ctx + d_1..d_j + v."""
    target = TARGETS[2]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    spec = SpecConfig(method="mirror", draft="self", draft_layers=2, exit_layer=2, gamma=4, budget=8)
    prompt = [10, 20, 30, 40, 50, 60]
    for j, v in [(0, 17), (2, 99), (spec.gamma, 123)]:
        tp, dp, drafter, root, window = _pipelines(target, DraftNet.self_draft(target, 2), spec, prompt, params)
        ctx = prompt + [root]
        G = len(window.ids)
        assert G == spec.gamma
        # position i: the window's own next token (likely accepted), then v
        ids = torch.tensor([[window.ids[i] if i < G else 1, v] for i in range(G + 1)])
        sig = EarlyExitSignal(0, ids, torch.log(torch.tensor([[0.9, 0.1]] * (G + 1))))
        drafter.expand(sig, spec.gamma, spec.budget)
        hit = drafter.take(Verdict(0, j, v))
        assert hit is not None
        fresh = NetworkDrafter(DraftNet.self_draft(target, 2), params, 256, 128)
        fresh.start(ctx + window.ids[:j] + [v])
        assert hit.ids == fresh.propose(spec.gamma).ids
        assert drafter.ctx == ctx + window.ids[:j] + [v]
        # the installed KV serves the next serial draft as a fresh prefill would
        verdict = Verdict(1, 1, 5)
        drafter.commit(verdict)
        fresh.commit(verdict)
        assert drafter.propose(spec.gamma).ids == fresh.propose(spec.gamma).ids


def test_pre_signal_rollouts_use_the_drafts_own_distribution_and_survive_the_signal():
    """pre_budget: before the signal the draft expands hypotheses ranked by its own top-k at
    window positions 0..G (read off the logits it computed while drafting; position G from
    prepare's feed); the signal's expansion adds others in later rows without disturbing them,
    and a hit on a pre-signal hypothesis proposes what serial drafting from that context would."""
    target = TARGETS[2]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    spec = SpecConfig(method="mirror", draft="self", draft_layers=2, exit_layer=2, gamma=4, budget=8, pre_budget=5)
    prompt = [10, 20, 30, 40, 50, 60]
    for pick in (0, 4):
        tp, dp, drafter, root, window = _pipelines(target, DraftNet.self_draft(target, 2), spec, prompt, params)
        drafter.max_rows = 16
        drafter.buf = drafter.net.new_branch_buffer(drafter.cache, 16, spec.gamma + 2)
        ctx = prompt + [root]
        G = len(window.ids)
        assert dp.prepare() == 5 and drafter.stats.pre_branches == 5
        sig = drafter.own_signal()
        fresh = NetworkDrafter(DraftNet.self_draft(target, 2), params, 256, 128)
        full = fresh.net(torch.tensor([ctx + window.ids]), torch.arange(len(ctx) + G)[None], fresh.cache)[0]
        top = torch.softmax(full[len(ctx) - 1:], -1).topk(sig.top_ids.shape[1])
        assert torch.equal(sig.top_ids, top.indices)  # positions 0..G: root, d_1..d_G
        # greedy: the top-1 weighs the agreement rate so far, the runners-up share the rest
        a, p = drafter.agree[0] / drafter.agree[1], top.values
        want = torch.cat([torch.full_like(p[:, :1], a), (1 - a) * p[:, 1:] / (1 - p[:, :1])], 1)
        torch.testing.assert_close(sig.top_logprobs.exp(), want, rtol=1e-4, atol=1e-6)
        pre = list(drafter._branches)
        assert len(pre) == 5 and all(v != (window.ids[j] if j < G else None) for j, v in pre)
        # the signal: other hypotheses only (each position's two least likely of 256 tokens)
        low = torch.softmax(full[len(ctx) - 1:], -1).argsort(-1)[:, :2]
        drafter.expand(EarlyExitSignal(0, low, torch.log(torch.full(low.shape, 0.5))), spec.gamma, spec.budget)
        assert set(pre) <= set(drafter._branches) and len(drafter._branches) > 5
        assert sorted(b[2] for b in drafter._branches.values()) == list(range(len(drafter._branches)))
        j, v = pre[pick]
        hit = drafter.take(Verdict(0, j, v))
        assert hit is not None and drafter.stats.pre_hits == 1
        fresh.start(ctx + window.ids[:j] + [v])
        assert hit.ids == fresh.propose(spec.gamma).ids
        # the hit window's own distribution was recorded by the rollout: pre-expansion goes on
        assert dp.prepare() == 5
        assert drafter.own_signal().top_ids[0].tolist() == fresh._own[0][0]


def test_a_hit_answered_mid_rollout_commits_to_the_window_sent():
    """rollout_stop="reply": a verdict arriving while a greedy rollout runs is answered with the
    tokens drafted so far (peek); the rollout finishes its step, and the hit then commits to
    exactly the window sent - the extra step's K/V and distribution serve the next window, and
    the drafter's state is what a fresh one has after the same tokens. A window that is not the
    rollout's is refused."""
    target = TARGETS[2]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    spec = SpecConfig(method="mirror", draft="self", draft_layers=2, exit_layer=2, gamma=4, budget=8)
    prompt = [10, 20, 30, 40, 50, 60]
    tp, dp, drafter, root, window = _pipelines(target, DraftNet.self_draft(target, 2), spec, prompt, params)
    ctx, G = prompt + [root], len(window.ids)
    j, v = G, 123
    verdict = Verdict(0, j, v)
    ids = torch.tensor([[window.ids[i] if i < G else v, v if i < G else 7] for i in range(G + 1)])
    sig = EarlyExitSignal(0, ids, torch.log(torch.tensor([[0.9, 0.1]] * (G + 1))))
    seen = []

    def handler_peeks():  # asked between rollout steps: the verdict "arrives" after two tokens
        w = drafter.peek(verdict)
        if w is not None and len(w.ids) == 2 and not seen:
            seen.append(w)
        return False

    assert drafter.peek(verdict) is None
    drafter.expand(sig, spec.gamma, spec.budget, should_stop=handler_peeks)
    sent = seen[0]
    assert drafter.peek(verdict).ids[:2] == sent.ids and len(drafter.peek(verdict).ids) == spec.gamma
    with pytest.raises(ValueError, match="not its rollout"):
        drafter.take(verdict, DraftWindow([sent.ids[0], 255 - sent.ids[1]], None, sent.source))
    drafter.expand(sig, spec.gamma, spec.budget)  # (the refused take cleared the branches)
    hit = drafter.take(verdict, sent)
    assert hit.ids == sent.ids and drafter.window.ids == sent.ids
    assert drafter.kv == len(drafter.ctx) + 2  # v, d'_1, d'_2 have K/V: no feed before the next rollouts
    fresh = NetworkDrafter(DraftNet.self_draft(target, 2), params, 256, 128)
    fresh.start(ctx + window.ids[:j] + [v])
    assert fresh.propose(2).ids == sent.ids
    nxt = Verdict(1, 1, 77)  # d'_1 accepted, then 77
    drafter.commit(nxt)
    fresh.commit(nxt)
    assert drafter.propose(spec.gamma).ids == fresh.propose(spec.gamma).ids


def test_greedy_pre_signal_ranking_follows_the_measured_agreement():
    """Greedy verification emits the target's argmax: a draft that has agreed with it at nearly
    every position so far rolls out the whole window's acceptance (G, its own top-1 after d_G)
    first, however flat its softmax; one that rarely agreed rolls out a runner-up at position 0.
    Verdicts update the count at every position whose own top-k is known."""
    target = TARGETS[2]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    spec = SpecConfig(method="mirror", draft="self", draft_layers=2, exit_layer=2, gamma=4, budget=8, pre_budget=1)
    prompt = [10, 20, 30, 40, 50, 60]
    tp, dp, drafter, root, window = _pipelines(target, DraftNet.self_draft(target, 2), spec, prompt, params)
    G = len(window.ids)
    dp.prepare()
    from mirror.decoding.drafters.base import rank_hypotheses

    own = drafter.own_signal  # re-read after setting the counts
    drafter.agree = [99.0, 100.0]
    best = rank_hypotheses(own(), window, 1)[0]
    assert (best.j, best.token) == (G, drafter._own[G][0][0])
    drafter.agree = [1.0, 100.0]
    best = rank_hypotheses(own(), window, 1)[0]
    assert best.j == 0 and best.token != window.ids[0]
    # a verdict accepting d_1 and then emitting the draft's runner-up at position 1: one agreement
    # (position 0: d_1 is the draft's own top-1 under greedy drafting), one disagreement
    t = drafter._own[1][0][1]
    drafter.agree = [0.0, 0.0]
    drafter.commit(Verdict(0, 1, t))
    assert drafter.agree == [1.0, 2.0]
    # a sampling draft keeps its own probabilities: they are the target's chances then
    sampled = NetworkDrafter(DraftNet.self_draft(target, 2), SamplingParams(temperature=0.8, seed=1), 256, 128)
    sampled._own, sampled.window = {0: ([7, 8], [0.6, 0.3])}, DraftWindow([])
    torch.testing.assert_close(sampled.own_signal().top_logprobs.exp(), torch.tensor([[0.6, 0.3]]))


def test_combined_draft_rolls_out_only_hypotheses_the_ngram_cannot_continue():
    """ngram+network Mirror-SD: a hit on a hypothesis the n-gram continues takes the n-gram's
    window, so the network spends its rows on the others only - and the output stays exact."""
    target = TARGETS[0]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    spec = SpecConfig(method="mirror", draft="ngram+self", draft_layers=2, exit_layer=2, gamma=3, kappa=4,
                      budget=12)
    prompt = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 11, 12, 5, 6]  # repeats: the n-gram continues some
    drafter = build_drafter(target, spec, params, 128)
    tp, dp = TargetPipeline(target, params, spec), DraftPipeline(drafter, spec)
    root = tp.start(prompt)
    window = dp.start(prompt + [root], spec.gamma)
    committed, both = prompt + [root], 0
    while len(committed) - len(prompt) < params.max_new_tokens:
        dp.prepare()
        dp.on_signal(tp.prefix(root, window))
        covered = {k for k, w in drafter.ngram._branches.items() if w.ids}
        rolled = set(drafter.net._branches)
        assert not covered & rolled
        both += bool(covered) and bool(rolled)
        verdict = tp.suffix()
        committed += window.ids[:verdict.accepted] + [verdict.token]
        root = verdict.token
        window = dp.on_verdict(verdict, spec.gamma)
    assert both > 0
    assert committed[len(prompt):][:params.max_new_tokens] == generate(target, TOK, prompt, params).ids


@pytest.mark.parametrize("method", ["sd", "mirror"])
def test_combined_draft_sends_the_ngram_window_only_when_it_is_expected_to_pay(method):
    """min_expected (SpecConfig.combine_min): an n-gram window goes out only when its scored
    expected acceptance reaches the threshold, the network drafts the other steps; 0 keeps the
    old rule (any n-gram continuation wins), an unreachable threshold leaves every step to the
    network. Output stays exact throughout."""
    from mirror.decoding.drafters.combined import CombinedDrafter
    from mirror.decoding.drafters.ngram import NgramDrafter, NgramModel
    from mirror.decoding.drafters.window_stop import WindowStop

    target = TARGETS[0]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    prompt = [5, 6, 7, 8, 9, 10, 11]
    ref = generate(target, TOK, prompt, params).ids
    # a datastore that knows the answer: its windows are right once a 4-token suffix is known,
    # and the table trusts exactly those (d4.*) - shorter suffixes score low
    store = NgramModel.build([ref], n_min=1, n_max=4, min_count=1)
    table = WindowStop({"c*": 0.9, "d*": 0.05, **{f"d4.{k}": 0.95 for k in range(5)}}, [1.0])
    spec = SpecConfig(method=method, draft="ngram+self", draft_layers=2, exit_layer=2, gamma=5, kappa=4, budget=8)
    sent = {}
    for cm in (0.0, 1.0, 5.0):
        net = build_drafter(target, SpecConfig(method=method, draft="self", draft_layers=2, budget=8), params, 128)
        net.name = "self"
        drafter = CombinedDrafter(params, NgramDrafter(params, 1, 4, datastore=store, score=table), net,
                                  min_expected=cm)
        real_use = drafter._use
        sent[cm] = []
        drafter._use = lambda w, real_use=real_use, cm=cm: sent[cm].append(w) or real_use(w)
        res = generate(target, TOK, prompt, params, spec, drafter=drafter)
        assert res.ids == ref
    ngram = {cm: [w for w in ws if w.source == "ngram"] for cm, ws in sent.items()}
    assert not ngram[5.0] and len(sent[5.0]) > 0  # no window expects 5 accepted tokens
    assert ngram[1.0] and all(w.expected >= 1.0 for w in ngram[1.0])
    assert any(w.source == "self" for w in sent[1.0])  # the low-scored steps went to the network
    assert any(w.expected < 1.0 for w in ngram[0.0])  # which the old rule sent as n-gram windows
    assert all(w.source == "ngram" for w in sent[0.0][1:])  # (the datastore always proposes)
    assert len(sent[1.0]) < len(sent[5.0])  # right windows: fewer steps than the untrained network alone


def test_rollback_keeps_both_caches_equal_to_a_fresh_prefill():
    """After every step, the target KV holds exactly the committed tokens but the root, the draft
    KV only committed tokens (plus its own fed window), and both equal a fresh prefill."""
    target = TARGETS[0]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    spec = SpecConfig(method="mirror", draft="self", draft_layers=2, exit_layer=2, gamma=3, kappa=3, budget=4)
    prompt = [7, 7, 3, 9, 1, 200, 31]
    tp, dp, drafter, root, window = _pipelines(target, DraftNet.self_draft(target, 2), spec, prompt, params)
    committed = prompt + [root]
    for _ in range(8):
        dp.prepare()  # as the draft worker does once the window is sent
        assert drafter.kv == len(committed) + len(window.ids)
        sig = tp.prefix(root, window)
        dp.on_signal(sig)
        verdict = tp.suffix()
        committed += window.ids[:verdict.accepted] + [verdict.token]
        root = verdict.token
        window = dp.on_verdict(verdict, spec.gamma)
        assert tp.cache.lengths[0] == len(committed) - 1  # root not yet in the target KV
        assert drafter.ctx == committed
        assert drafter.kv <= len(committed) + len(window.ids)
        n = tp.cache.lengths[0]
        fresh = target.new_cache(1, 128)
        target(torch.tensor([committed[:n]]), torch.arange(n)[None], fresh)
        torch.testing.assert_close(tp.cache.k[:, 0, :, :n], fresh.k[:, 0, :, :n], rtol=1e-4, atol=1e-5)
        kv = min(drafter.kv, len(committed))
        dfresh = drafter.net.new_cache(1, 128)
        drafter.net(torch.tensor([committed[:kv]]), torch.arange(kv)[None], dfresh)
        torch.testing.assert_close(drafter.cache.k[:, 0, :, :kv], dfresh.k[:, 0, :, :kv], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cut", [1, 3])
def test_verify_cut_ends_the_suffix_where_the_exit_predicts_a_rejection(cut):
    """verify_cut=c: the suffix runs rows 0..j-1 for the first draft token d_j outside the exit's
    top-c at position j-1. The exit is scripted here (a random tiny model's exit ranks nothing
    well) to put each window's cut at every position in turn; against the full verification of
    the same window: the same verdict when the target rejects before the cut, else the window
    ends at the cut with the target's own token; the KV cache then holds what a fresh prefill of
    the committed tokens gives."""
    target = TARGETS[0]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    spec = SpecConfig(method="mirror", draft="ngram", gamma=6, kappa=4, exit_layer=2, verify_cut=cut)
    full = SpecConfig(method="mirror", draft="ngram", gamma=6, kappa=4, exit_layer=2)
    prompt = [9, 8, 7, 6, 5, 4]
    ref = generate(target, TOK, prompt, SamplingParams(max_new_tokens=12, ignore_eos=True)).ids
    # windows: the target's own continuation, and one it rejects at d_3
    windows = [ref[1:7], ref[1:3] + [(ref[3] + 1) % 256] + ref[4:7]]
    outcomes = set()
    for ids in windows:
        for k in range(len(ids) + 1):  # the exit ranks d_{k+1} outside its top-c (k = G: nowhere)
            def scripted(h, ids=ids, k=k):
                rows = [[(d + 1 + r) % 256 for r in range(4)] for d in ids + [0]]
                for i, d in enumerate(ids):
                    if i != k:
                        rows[i][cut - 1] = d  # inside the top-c
                return torch.tensor(rows), torch.full((len(rows), 4), -1.0)
            tp, tf = TargetPipeline(target, params, spec), TargetPipeline(target, params, full)
            tp.exit = scripted
            root = tp.start(prompt)
            assert tf.start(prompt) == root == ref[0]
            w = DraftWindow(list(ids), None, "test")
            tp.prefix(root, w)
            tf.prefix(root, w)
            j = k + 1  # rows run
            assert tp.verified_rows() == j and tf.verified_rows() == len(ids) + 1
            v, vf = tp.suffix(), tf.suffix()
            mt = tp.metrics
            assert mt.cut_tokens == len(ids) + 1 - j and mt.drafted_tokens == len(ids)
            assert mt.cut_steps == (j <= len(ids)) and mt.cut_wrong == (j <= len(ids) and vf.accepted >= j)
            if vf.accepted < j - 1:  # rejected before the cut: nothing changes
                assert (v.accepted, v.token) == (vf.accepted, vf.token)
                outcomes.add("before")
            else:  # the window ends at the cut: d_1..d_{j-1} accepted, then the target's own token
                assert v.accepted == j - 1
                assert v.token == (ids[j - 1] if vf.accepted >= j else vf.token)
                outcomes.add("wrong cut" if vf.accepted >= j else "at the cut")
            committed = prompt + [root] + ids[:v.accepted]
            assert committed + [v.token] == (prompt + ref)[:len(committed) + 1]  # exactly the target's output
            n = tp.cache.lengths[0]
            assert n == len(committed)
            fresh = target.new_cache(1, 128)
            target(torch.tensor([committed]), torch.arange(n)[None], fresh)
            torch.testing.assert_close(tp.cache.k[:, 0, :, :n], fresh.k[:, 0, :, :n], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(tp.cache.v[:, 0, :, :n], fresh.v[:, 0, :, :n], rtol=1e-4, atol=1e-5)
    assert outcomes == {"before", "at the cut", "wrong cut"}


def test_hypotheses_stop_at_the_rows_the_target_verifies():
    """rank_hypotheses: without a cut, (j, v) for j = 0..G and v != d_{j+1}, most likely first;
    with signal.rows = r (verify_cut), only j < r, and at j = r - 1 the draft's own d_r too (the
    target's token where the window was cut may be the draft's)."""
    from mirror.decoding.drafters.base import rank_hypotheses

    w = DraftWindow([10, 11, 12, 13])
    ids = torch.tensor([[10, 20, 21], [11, 22, 23], [24, 12, 25], [13, 26, 27], [28, 29, 30]])
    logp = torch.tensor([[0.7, 0.2, 0.1]] * 5).log()
    full = rank_hypotheses(EarlyExitSignal(0, ids, logp), w, 100)
    assert {(h.j, h.token) for h in full} == {(j, int(v)) for j in range(5) for v in ids[j]
                                               if j == 4 or int(v) != w.ids[j]}
    assert [h.score for h in full] == sorted((h.score for h in full), reverse=True)
    assert (full[0].j, full[0].token) == (2, 24)  # 0.7 * 0.7 * 0.7: d_1, d_2 survive, then the exit's top
    cut = rank_hypotheses(EarlyExitSignal(0, ids, logp, rows=3), w, 100)
    assert {(h.j, h.token) for h in cut} == {(0, 20), (0, 21), (1, 22), (1, 23), (2, 24), (2, 12), (2, 25)}


def test_sampling_speculative_is_seeded_and_valid():
    target = TARGETS[1]
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=40, seed=5, ignore_eos=True)
    for rule in ("stochastic", "match"):
        spec = SpecConfig(method="mirror", draft="self", draft_layers=2, exit_layer=2, rule=rule)
        a = generate(target, TOK, [1, 2, 3, 4], params, spec)
        b = generate(target, TOK, [1, 2, 3, 4], params, spec)
        assert a.ids == b.ids and len(a.ids) == 20


def test_spec_config_validates():
    for bad in (dict(method="beam"), dict(draft="medusa"), dict(gamma=0), dict(kappa=0),
                dict(confidence=1.5), dict(draft="model"), dict(ngram_min=3, ngram_max=2)):
        with pytest.raises(ValueError):
            SpecConfig(**bad)
    with pytest.raises(ValueError, match="exit_layer"):
        SpecConfig(exit_layer=9).resolve_exit_layer(4)
    for bad in (dict(draft="ngram+self", combine_min=-1.0), dict(draft="ngram+self", gamma=3, combine_min=4.0),
                dict(draft="ngram+self", combine_min="1")):
        with pytest.raises(ValueError, match="combine_min must be"):
            SpecConfig(**bad)
    with pytest.raises(ValueError, match="combined draft"):
        SpecConfig(draft="model", draft_model="target", combine_min=1.0)
    for bad in (dict(verify_cut=-1), dict(kappa=4, verify_cut=5), dict(verify_cut=True), dict(verify_cut=1.5)):
        with pytest.raises(ValueError, match="verify_cut must be"):
            SpecConfig(**bad)


def test_a_trimmed_draft_feeds_back_the_tokens_it_proposed():
    """Serial drafting with a VocabTrim head: each drafted token is fed back as its target-vocab
    id, so when the trim keeps every token the full head would pick, the window is the untrimmed
    draft's window (a draft-vocab index fed as a token id would derail it after one token)."""
    target = TARGETS[2]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    ctx = [10, 20, 30, 40, 50, 60, 7]
    full = NetworkDrafter(DraftNet.self_draft(target, 2), params, 256, 128)
    full.start(ctx)
    ref = full.propose(6).ids
    gone = [t for t in range(256) if t not in ref][:8]  # shift every kept id's draft index
    keep = torch.tensor([t for t in range(256) if t not in gone])
    trimmed = NetworkDrafter(DraftNet.self_draft(target, 2, keep_ids=keep), params, 256, 128)
    trimmed.start(ctx)
    assert trimmed.propose(6).ids == ref
