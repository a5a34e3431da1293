"""sd and mirror on the real bundled model reproduce plain greedy decoding on Spec-Bench prompts
(48 new tokens), for every draft kind: the n-gram drafts (the default's, with the artifacts shipped
for the bundled model: datastore, trained exit head and its trim) on 2 prompts per category, the
untrained network drafts (slow: nearly every step is a correction) on 1 per category."""
import os

import pytest
import torch

from benchmarks.specbench import CATEGORIES, category, default_questions_path, load_questions, select
from mirror.decoding.factory import generate
from mirror.models import save_hf
from mirror.models.llama import Transformer
from mirror.sampling import SamplingParams
from mirror.spec_config import SpecConfig

QPATH = default_questions_path()
pytestmark = pytest.mark.skipif(QPATH is None, reason="Spec-Bench is absent (../shared/specbench/question.jsonl)")
PARAMS = SamplingParams(max_new_tokens=48, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(bundled):
    qs = select(load_questions(QPATH), 2)
    assert sorted({category(q) for q in qs}) == sorted(CATEGORIES) and len(qs) == 12
    cats = [category(q) for q in qs]
    assert cats[::2] == cats[1::2]  # category pairs: prompts[::2] is one per category
    return [bundled.tokenizer.encode_chat([{"role": "user", "content": q["turns"][0]}]) for q in qs]


@pytest.fixture(scope="module")
def reference(bundled, prompts):
    return [generate(bundled.model, bundled.tokenizer, p, PARAMS).ids for p in prompts]


@pytest.fixture(scope="module")
def trim_file(bundled, tmp_path_factory):
    """A VocabTrim set for the drafts (the 8192 lowest ids, i.e. the earliest BPE merges): keeps
    the untrained drafts cheap. Trimming changes what a draft can propose, never the output."""
    from mirror.decoding.drafters.vocab_trim import VocabTrim

    p = tmp_path_factory.mktemp("trim") / "trim.json"
    VocabTrim(range(8192), bundled.model.cfg.vocab_size).save(str(p))
    return str(p)


@pytest.fixture(scope="module")
def small_draft_dir(bundled, tmp_path_factory):
    """A separate 3-layer model sharing the tokenizer (the target's first layers, re-saved)."""
    t = bundled.model
    cfg = t.cfg.with_(n_layers=3)
    small = Transformer(cfg)
    small.load_state_dict({k: v for k, v in t.state_dict().items()
                           if not k.startswith("layers.") or int(k.split(".")[1]) < 3}, strict=False)
    d = tmp_path_factory.mktemp("small")
    save_hf(small, str(d))
    return str(d)


# Untrained drafts are cheap to build but propose poorly; small settings keep this test fast.
DRAFT_SPECS = {
    "self": dict(draft="self", draft_layers=2),
    "model": dict(draft="model"),
    "ngram": dict(draft="ngram", ngram_datastore="bundled"),
    "ngram+stop": dict(draft="ngram", ngram_datastore="bundled", window_stop="bundled"),
    "streaming": dict(draft="streaming", draft_layers=2, streams=2),
    "ngram+self": dict(draft="ngram+self", draft_layers=2, confidence=0.2),
}


# the window stop lives in the drafter, shared by both methods: its mirror case covers it
@pytest.mark.parametrize("method,kind", [(m, k) for k in DRAFT_SPECS for m in ("sd", "mirror")
                                         if (m, k) != ("sd", "ngram+stop")])
def test_bundled_greedy_speculative_equals_plain(bundled, prompts, reference, small_draft_dir, trim_file,
                                                 method, kind):
    kw = dict(DRAFT_SPECS[kind])
    if kind == "model":
        kw["draft_model"] = small_draft_dir
    ngram = kind.startswith("ngram") and "self" not in kind
    if not ngram:
        kw["vocab_trim"] = trim_file
    elif method == "mirror":
        kw.update(exit_head="bundled", exit_trim="bundled")
    if ngram:  # the default deployment's settings
        spec = SpecConfig(method=method, gamma=5, kappa=8, budget=48, **kw)
    else:  # untrained networks: nearly every step is a correction, so keep the windows short
        spec = SpecConfig(method=method, gamma=2, kappa=2, budget=1, branch_batch=1, **kw)
    steps = drafted = 0
    pairs = list(zip(prompts, reference))
    if not ngram:
        pairs = pairs[::2]  # the first prompt of each category (prompts come in category pairs)
    for p, ref in pairs:
        res = generate(bundled.model, bundled.tokenizer, p, PARAMS, spec)
        assert res.ids == ref
        steps += res.metrics.target_steps
        drafted += res.metrics.drafted_tokens
    assert steps < len(pairs) * (PARAMS.max_new_tokens - 1) or not ngram  # drafting happened at all
    if kind == "ngram+stop":  # the stop cut windows short of gamma, and not to nothing
        assert 1 <= drafted / steps < 0.8 * spec.gamma
