"""The n-gram draft (context index + datastore, its modes), the datastore builder and the
offline replay used to design it."""
import json

import pytest

from benchmarks.draft_sim import replay
from mirror.decoding.drafters.ngram import NgramDrafter, NgramModel
from mirror.decoding.messages import DraftWindow, Verdict
from mirror.sampling import SamplingParams

from helpers import byte_tokenizer, tiny_model

P = SamplingParams()


def test_datastore_keeps_the_most_frequent_continuation_of_frequent_ngrams():
    store = NgramModel.build([[1, 2, 3, 1, 2, 3, 1, 2, 4], [9, 9]], n_min=1, n_max=2, min_count=2)
    assert store.table[(1, 2)] == 3  # 3 twice, 4 once
    assert store.table[(1,)] == 2
    assert (9,) not in store.table  # seen once
    assert store.draft([7, 1], 4) == [2, 3, 1, 2]
    assert store.next_token([5, 1, 2]) == (3, 2)


def test_modes_differ_only_where_they_should():
    store = NgramModel({(8,): 9, (9,): 10, (5, 6): 11}, 1, 2)
    ctx = [5, 6, 7, 8, 1, 5, 6]  # context: (5, 6) -> 7, then 8; the store says (5, 6) -> 11
    fb = NgramDrafter(P, 2, 4, datastore=store, mode="fallback")
    fill = NgramDrafter(P, 2, 4, datastore=store, mode="fill")
    mixed = NgramDrafter(P, 2, 4, datastore=store, mode="mixed")
    for d in (fb, fill, mixed):
        d.start(ctx)
    # the context match (length 2) continues 7, 8, 1, 5, 6; fallback and fill take it whole
    assert fb.propose(5).ids == [7, 8, 1, 5, 6]
    assert fill.propose(5).ids == [7, 8, 1, 5, 6]
    assert mixed.propose(5).ids == [7, 8, 1, 5, 6]
    for d in (fb, fill, mixed):  # commit 7, 8 and a correction 2: the context has no match now
        d.commit(Verdict(0, 2, 9))
    # no context match for (..., 8, 9): fallback and fill use the store (9 -> 10), mixed too
    assert fb.propose(3).ids == [10]
    assert fill.propose(3).ids == [10]
    assert mixed.propose(3).ids == [10]
    d = NgramDrafter(P, 2, 4, datastore=store, mode="fill")
    d.start([7, 8, 7, 8])  # the context match runs out after 2 tokens (7, 8), the store goes on
    assert d.propose(4).ids == [7, 8, 9, 10]
    fb2 = NgramDrafter(P, 2, 4, datastore=store, mode="fallback")
    fb2.start([7, 8, 7, 8])
    assert fb2.propose(4).ids == [7, 8]
    with pytest.raises(ValueError, match="unknown n-gram mode"):
        NgramDrafter(P, mode="longest")


def test_mixed_mode_prefers_the_longer_suffix_across_sources():
    store = NgramModel({(2, 3, 4): 50, (4,): 60}, 1, 3)
    d = NgramDrafter(P, 2, 4, datastore=store, mode="mixed")
    d.start([3, 4, 70, 2, 3, 4])  # context: (3, 4) -> 70 (n=2); the store knows (2, 3, 4) -> 50 (n=3)
    assert d.propose(1).ids == [50]
    f = NgramDrafter(P, 2, 4, datastore=store, mode="fallback")
    f.start([3, 4, 70, 2, 3, 4])
    assert f.propose(1).ids == [70]


class _Oracle:
    """Proposes the true continuation (or nothing): replay's tau must match by construction."""

    def __init__(self, answer, n):
        self.answer, self.n, self.pos = answer, n, 0

    def start(self, ctx):
        self.pos = 1

    def propose(self, gamma):
        self.window = DraftWindow(self.answer[self.pos:self.pos + min(gamma, self.n)])
        return self.window

    def commit(self, v):
        self.pos += v.accepted + 1


@pytest.mark.parametrize("n,gamma,steps", [(0, 5, 12), (5, 5, 2), (2, 5, 4), (5, 3, 3)])
def test_replay_counts_steps_like_greedy_speculative_decoding(n, gamma, steps):
    answer = list(range(100, 113))  # 13 tokens: 1 from prefill, 12 from steps
    s, t = replay(_Oracle(answer, n), [1, 2], answer, gamma)
    assert (s, t) == (steps, 12)


def test_build_datastore_generates_caches_and_resumes(tmp_path):
    from mirror.training.datastore import build_datastore, target_answers

    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"prompt number {i} " * (i + 1)}) for i in range(5)))
    model, tok = tiny_model(), byte_tokenizer()
    out = tmp_path / "ds"
    logs = []
    store = build_datastore(model, tok, str(data), 3, str(out), max_new_tokens=6, batch=2, min_count=1,
                            log=logs.append)
    lines = (out / "answers.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["settings"]["max_new_tokens"] == 6
    answers = [json.loads(x)["ids"] for x in lines[1:]]
    assert all(1 <= len(a) <= 6 for a in answers)
    assert store.meta["answer_tokens"] == sum(map(len, answers))
    assert NgramModel.load(str(out / "datastore.json")).table == store.table
    a = answers[0]
    if len(a) > 1:  # every answer bigram is in a min_count=1 store
        assert (a[0],) in store.table
    # resume: two more prompts are generated, the first three come from the cache unchanged
    logs.clear()
    more = target_answers(model, tok, str(data), 5, str(out), max_new_tokens=6, batch=2, log=logs.append)
    assert "3 answers cached, generating 2" in logs[0]
    assert sorted(map(tuple, more[:3])) == sorted(map(tuple, answers))
    with pytest.raises(ValueError, match="other settings"):
        target_answers(model, tok, str(data), 5, str(out), max_new_tokens=7, batch=2)
