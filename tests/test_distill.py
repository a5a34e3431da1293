"""`mirror distill-draft` (a separate small draft distilled from the target's answers) and the
replay of network drafts in benchmarks/draft_sim.py."""
import json

import pytest

from benchmarks.draft_sim import ReplayNet, network_predictions, replay
from mirror.decoding.drafters.vocab_trim import VocabTrim
from mirror.decoding.factory import generate, load_draft_model
from mirror.sampling import SamplingParams
from mirror.spec_config import SpecConfig

from helpers import byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    from mirror.training.distill import distill_draft

    d = tmp_path_factory.mktemp("distill")
    data = d / "p.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"prompt {i}: " + "abc " * (i + 2)}) for i in range(8)))
    trim = d / "trim.json"
    model, tok = tiny_model(), byte_tokenizer()
    VocabTrim(range(200), model.cfg.vocab_size).save(str(trim))
    kw = dict(prompts=6, layers=1, epochs=8, lr=3e-3, batch_tokens=128, vocab_trim=str(trim), bf16=False,
              max_new_tokens=12, log=lambda *a: None)
    report = distill_draft(model, tok, str(data), str(d / "out"), **kw)
    return model, tok, d, data, kw, report


def test_distill_draft_learns_saves_and_resumes(distilled):
    from mirror.training.distill import distill_draft

    model, tok, d, data, kw, report = distilled
    assert report["sequences"] == 6 and report["steps"] > 0
    assert report["final_loss"] < report["first_loss"]  # it learned the target's answers
    meta = json.loads((d / "out" / "model" / "draft.json").read_text())
    assert meta["vocab_trim"] == "vocab_trim.json" and meta["settings"]["layers"] == 1
    dm = load_draft_model(str(d / "out" / "model"), model)
    assert dm.cfg.n_layers == 1 and dm.cfg.vocab_size == model.cfg.vocab_size
    # a finished run resumes to the same result; other settings in the same folder are refused
    again = distill_draft(model, tok, str(data), str(d / "out"), **kw)
    assert again["final_loss"] == report["final_loss"]
    with pytest.raises(ValueError, match="other settings"):
        distill_draft(model, tok, str(data), str(d / "out"), **{**kw, "layers": 2})


@pytest.fixture(scope="module")
def truncated(distilled):
    """A draft that agrees with the target often: its first n-1 layers (tiny: 3 of 4)."""
    from mirror.models import save_hf
    from mirror.models.llama import Transformer

    model, _, d, _, _, _ = distilled
    k = model.cfg.n_layers - 1
    small = Transformer(model.cfg.with_(n_layers=k))
    small.load_state_dict({n: v for n, v in model.state_dict().items()
                           if not n.startswith("layers.") or int(n.split(".")[1]) < k}, strict=False)
    save_hf(small.prepare(), str(d / "truncated"))
    return str(d / "truncated")


@pytest.mark.parametrize("draft", ["distilled", "truncated"])
@pytest.mark.parametrize("method", ["sd", "mirror"])
def test_draft_model_is_lossless_and_replay_counts_its_steps(distilled, truncated, method, draft):
    model, tok, d, _, _, _ = distilled
    path = str(d / "out" / "model") if draft == "distilled" else truncated
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompts = [tok.encode("abc abc abc "), tok.encode("prompt 3: abc")]
    ref = [generate(model, tok, p, params).ids for p in prompts]
    spec = SpecConfig(method=method, draft="model", draft_model=path, gamma=3, kappa=2, budget=4)
    runs = [generate(model, tok, p, params, spec) for p in prompts]
    assert [r.ids for r in runs] == ref  # lossless whatever the draft proposes
    # the offline replay of the same draft on the same answers counts the same target steps
    preds, agree = network_predictions(path, list(zip(prompts, ref)))
    assert draft == "distilled" or agree > 0.2  # the truncated draft is accepted often
    for p, r, pr in zip(prompts, runs, preds):
        steps, toks = replay(ReplayNet(pr, len(p)), p, r.ids, 3)
        assert toks == len(r.ids) - 1
        assert steps == r.metrics.target_steps


def test_training_precision_follows_the_cpus_bf16_support(tmp_path, monkeypatch):
    """--precision auto trains in bf16 only where the CPU has native bf16 (AVX512-BF16 / AMX)."""
    import argparse

    import mirror.training.distill as distill
    from mirror.cli import _train_bf16
    from mirror.training.distill import cpu_has_fast_bf16

    amx, avx2 = tmp_path / "amx", tmp_path / "avx2"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n")
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert cpu_has_fast_bf16(str(amx)) and not cpu_has_fast_bf16(str(avx2))
    assert not cpu_has_fast_bf16(str(tmp_path / "missing"))
    for native in (True, False):
        monkeypatch.setattr(distill, "cpu_has_fast_bf16", lambda native=native: native)
        assert _train_bf16(argparse.Namespace(fp32=False, precision="auto")) is native
        assert _train_bf16(argparse.Namespace(fp32=False, precision="bf16")) is True
        assert _train_bf16(argparse.Namespace(fp32=True, precision="auto")) is False
