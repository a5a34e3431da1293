"""End-to-end on the real bundled model (SmolLM2-135M-Instruct, Q4_1 GGUF)."""
import torch

from mirror.decoding.ar import generate_ar, prefill
from mirror.models.bundled import bundled_model_path
from mirror.sampling import SamplingParams


def test_bundled_model_is_found_without_configuration():
    assert bundled_model_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_bundled_model_answers_paris(bundled):
    tok = bundled.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    chunks = []
    res = generate_ar(bundled.model, tok, ids, SamplingParams(max_new_tokens=32),
                      on_chunk=lambda text, new: chunks.append(text))
    assert "Paris" in res.text
    assert "".join(chunks) == res.text
    assert res.finish_reason == "stop"  # ended on <|im_end|>, which is not in the text
    assert "<|im_end|>" not in res.text


def test_bundled_window_forward_is_bitwise_equal_to_token_by_token(bundled):
    m = bundled.model
    toks = torch.randint(0, m.cfg.vocab_size, (1, 50), generator=torch.Generator().manual_seed(4))
    c1, c2 = m.new_cache(1, 64), m.new_cache(1, 64)
    prefill(m, c1, toks[0, :26].tolist())
    prefill(m, c2, toks[0, :26].tolist())
    one = torch.cat([m(toks[:, i:i + 1], torch.tensor([[i]]), c1) for i in range(26, 50)], 1)
    win = torch.cat([m(toks[:, i:i + 6], torch.arange(i, i + 6)[None], c2) for i in range(26, 50, 6)], 1)
    assert torch.equal(one, win)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(bundled):
    tok = bundled.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": "Tell me a short story about a cat."}])
    p = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=123)
    a = generate_ar(bundled.model, tok, ids, p)
    b = generate_ar(bundled.model, tok, ids, p)
    c = generate_ar(bundled.model, tok, ids, SamplingParams(max_new_tokens=24, temperature=1.0, seed=7))
    assert a.ids == b.ids
    assert a.ids != c.ids
