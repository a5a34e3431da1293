"""The int8 draft (mirror/models/quant.py): QuantLinear, SmoothQuant's exactness before
rounding, calibration, the factory's 'target' copy, bad settings; on the bundled model, the
shipped calibration's gain in agreement with the target and lossless sd/mirror with the draft."""
import pytest
import torch

from mirror.decoding.drafters.network import DraftNet
from mirror.decoding.factory import generate, load_draft_model
from mirror.models import quant
from mirror.models.ops import Linear
from mirror.sampling import SamplingParams
from mirror.spec_config import SpecConfig

from helpers import byte_tokenizer, tiny_model

pytestmark = pytest.mark.skipif(not quant.int8_available(), reason="this torch build has no quantized CPU engine")


def _logits(model, ids):
    net = DraftNet.from_model(model)
    with torch.inference_mode():
        return net(torch.tensor([ids]), torch.arange(len(ids))[None], net.new_cache(1, len(ids)))[0]


def test_quant_linear_is_close_to_fp32():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    x = torch.randn(5, 3, 64, generator=g)
    ref = torch.nn.functional.linear(x, w, b)
    y = quant.QuantLinear(w, b)(x)
    assert y.shape == ref.shape
    rel = float((y - ref).norm() / ref.norm())
    assert 0 < rel < 0.03  # int8 rounding: close, not equal


def test_trimmed_int8_head_is_the_full_head_at_the_kept_rows():
    """VocabTrim on an int8 head keeps its int8 rows as they were: the trimmed layer's outputs are
    the full layer's at the kept ids, bit for bit (same weights, same per-call activation scale)."""
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(300, 64, generator=g), torch.randn(300, generator=g)
    full = quant.QuantLinear(w, b)
    keep = torch.tensor([7, 0, 299, 150, 42])
    from mirror.decoding.drafters.network import trimmed_head

    trim = trimmed_head(full, keep)
    assert isinstance(trim, quant.QuantLinear) and trim.out_features == 5
    x = torch.randn(3, 64, generator=g)
    assert torch.equal(trim(x), full(x)[:, keep])
    deq, _ = full.dequantized()
    assert float((deq - w).abs().max()) < float(w.abs().max()) / 127  # within one int8 step


def test_smoothing_is_exact_before_rounding(monkeypatch):
    """With QuantLinear swapped for an fp32 linear, the smoothed copy computes the target's
    function: the scales folded into norms / up rows cancel exactly."""
    model = tiny_model()
    ids = list(range(3, 40))
    act = quant.calibrate_act_max(model, [ids[:20], ids[10:]], progress=False)
    names = {n for n, m in model.named_modules() if isinstance(m, Linear)}
    assert set(act) == names
    assert all(act[n].numel() == m.in_features and bool((act[n] >= 0).all())
               for n, m in model.named_modules() if isinstance(m, Linear))

    class Fp32(torch.nn.Module):
        def __init__(self, weight, bias=None):
            super().__init__()
            self.w, self.b = weight.detach().float(), bias

        @classmethod
        def from_linear(cls, lin):
            return cls(lin.weight, lin.bias)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w, self.b)

    monkeypatch.setattr(quant, "QuantLinear", Fp32)
    ref = _logits(model, ids)
    smoothed = quant.smoothed_copy(model, act, alpha=0.85)
    # equal up to fp32 rounding: logits reach ~32 here, and the rounding depends on the CPU's
    # GEMM kernels (on an AVX-512 EPYC the largest difference is 1.0e-4, just over the 1e-4 this
    # test allowed when it was written on AVX2); scales that did not cancel would be off by O(1)
    torch.testing.assert_close(_logits(smoothed, ids), ref, atol=5e-4, rtol=1e-4)
    # and it did move the scales (otherwise this test proves nothing)
    assert not torch.allclose(smoothed.layers[0].attn_norm.weight, model.layers[0].attn_norm.weight)


def test_quantized_copy_leaves_the_target_alone():
    model = tiny_model()
    ids = list(range(5, 30))
    ref = _logits(model, ids)
    norm0 = model.layers[0].attn_norm.weight.clone()
    act = quant.calibrate_act_max(model, [ids], progress=False)
    q = quant.smoothed_copy(model, act)
    assert sum(isinstance(m, quant.QuantLinear) for m in q.modules()) == 4 * len(model.layers) + 1
    assert not any(isinstance(m, quant.QuantLinear) for m in model.modules())
    assert torch.equal(model.layers[0].attn_norm.weight, norm0)
    assert torch.equal(_logits(model, ids), ref)
    out = _logits(q, ids)
    assert out.shape == ref.shape and not torch.equal(out, ref)


def test_calibration_file_round_trip_and_mismatch(tmp_path):
    model = tiny_model()
    act = quant.calibrate_act_max(model, [list(range(3, 20))], progress=False)
    p = str(tmp_path / "c.safetensors")
    quant.save_calibration(p, act, {"alpha": 0.7})
    back, meta = quant.load_calibration(p)
    assert meta["alpha"] == "0.7" and set(back) == set(act)
    assert all(torch.equal(back[k], act[k]) for k in act)
    with pytest.raises(ValueError, match="does not match"):
        quant.smoothed_copy(model, {k: v for k, v in act.items() if k != "lm_head"})
    other = tiny_model(n_layers=model.cfg.n_layers + 1)
    with pytest.raises(ValueError, match="does not match"):
        quant.smoothed_copy(other, act)
    with pytest.raises(FileNotFoundError, match="calibrate-int8"):
        quant.load_calibration(str(tmp_path / "missing.safetensors"))


def test_int8_target_draft_is_lossless_on_a_tiny_model(tmp_path):
    model, tok = tiny_model(), byte_tokenizer()
    act = quant.calibrate_act_max(model, [list(range(3, 40))], progress=False)
    p = str(tmp_path / "c.safetensors")
    quant.save_calibration(p, act, {"alpha": 0.85})
    prompt = tok.encode("the int8 draft")
    params = SamplingParams(max_new_tokens=24)
    plain = generate(model, tok, prompt, params)
    from mirror.decoding.drafters.vocab_trim import VocabTrim

    trim = str(tmp_path / "trim.json")  # a quarter of the tiny vocabulary, the prompt's bytes among it
    VocabTrim(sorted(set(prompt) | set(range(0, model.cfg.vocab_size, 4))), model.cfg.vocab_size).save(trim)
    for method in ("sd", "mirror"):
        for vocab_trim in (None, trim):
            spec = SpecConfig(method=method, draft="model", draft_model="target", draft_quant="int8", int8_calib=p,
                              gamma=4, kappa=2, budget=2, branch_batch=2, vocab_trim=vocab_trim)
            res = generate(model, tok, prompt, params, spec)
            assert res.ids == plain.ids
            assert res.metrics.drafted_tokens > 0
    from mirror.decoding.factory import build_draft_net

    head = build_draft_net(model, spec, "model").head  # the trim reached the int8 head
    assert isinstance(head, quant.QuantLinear) and head.out_features == len(VocabTrim.load(trim))


def test_bad_int8_settings_are_refused():
    with pytest.raises(ValueError, match="draft_quant"):
        SpecConfig(method="sd", draft="ngram", draft_quant="int8")
    with pytest.raises(ValueError, match="unknown draft_quant"):
        SpecConfig(method="sd", draft="model", draft_model="target", draft_quant="int4")
    with pytest.raises(ValueError, match="target itself"):
        load_draft_model("target", tiny_model())


# --- the bundled model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled_answers(bundled):
    """Plain greedy answers of the target to a few prompts (not Spec-Bench, not training data)."""
    tok = bundled.tokenizer
    params = SamplingParams(max_new_tokens=48)
    out = []
    for q in ("Write a short note about rivers.", "How do I boil an egg?", "List three uses of copper."):
        ids = tok.encode_chat([{"role": "user", "content": q}])
        out.append((ids, generate(bundled.model, tok, ids, params).ids))
    return out


def _agreement(model, pairs) -> float:
    hit = total = 0
    for prompt, ans in pairs:
        lg = _logits(model, prompt + ans)
        pred = lg[len(prompt) - 1:len(prompt) + len(ans) - 1].argmax(-1)
        hit += int((pred == torch.tensor(ans)).sum())
        total += len(ans)
    return hit / total


def test_bundled_calibration_raises_agreement(bundled, bundled_answers):
    """SmoothQuant with the shipped statistics agrees with the fp32 target's greedy tokens far more
    often than plain int8 (0.86 against 0.57 on held-out training answers; see README)."""
    t = bundled.model
    plain = _agreement(quant.quantized_copy(t), bundled_answers)
    smooth = _agreement(load_draft_model("target", t, "int8", "bundled"), bundled_answers)
    assert smooth > plain + 0.1, (plain, smooth)


@pytest.mark.parametrize("method", ["sd", "mirror"])
def test_bundled_int8_draft_equals_plain(bundled, bundled_answers, method):
    spec = SpecConfig(method=method, draft="model", draft_model="target", draft_quant="int8", int8_calib="bundled",
                      gamma=5, kappa=4, budget=2, branch_batch=2, exit_head="bundled", exit_trim="bundled")
    params = SamplingParams(max_new_tokens=48)
    drafted = accepted = 0
    for prompt, ref in bundled_answers:
        res = generate(bundled.model, bundled.tokenizer, prompt, params, spec)
        assert res.ids == ref
        drafted += res.metrics.drafted_tokens
        accepted += res.metrics.accepted_tokens
    assert drafted > 0 and accepted > 0
