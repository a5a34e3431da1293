"""The model core: layer-split forward, batch invariance, KV rollback/fork, batching, loaders."""
import json

import numpy as np
import pytest
import torch

from helpers import greedy_reference, tiny_model, write_gguf
from mirror.decoding.ar import prefill
from mirror.models import ModelLoadError, load_model, save_hf
from mirror.models.loader import build_model, load_gguf_state, load_hf_state

PRESETS = ["tiny", "tiny-qwen2", "tiny-qwen3", "tiny-llama3"]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("split", [1, 2, 3])
def test_prefix_then_suffix_equals_full_forward(preset, split):
    m = tiny_model(preset, seed=1)
    toks = torch.randint(0, m.cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(23).expand(2, 23)
    full = m(toks, pos, m.new_cache(2, 64))
    c = m.new_cache(2, 64)
    h = m.forward_layers(m.embed(toks), pos, c, 0, split)
    h = m.forward_layers(h, pos, c, split, m.cfg.n_layers)
    assert torch.equal(m.head(h), full)


@pytest.mark.parametrize("preset", PRESETS)
def test_window_forward_is_bitwise_equal_to_token_by_token(preset):
    """The property lossless greedy speculation rests on: a token's logits do not depend on how
    many tokens share its forward pass."""
    m = tiny_model(preset, seed=3)
    toks = torch.randint(0, m.cfg.vocab_size, (1, 60), generator=torch.Generator().manual_seed(4))
    c1, c2 = m.new_cache(1, 128), m.new_cache(1, 128)
    prefill(m, c1, toks[0, :20].tolist())
    prefill(m, c2, toks[0, :20].tolist())
    one = torch.cat([m(toks[:, i:i + 1], torch.tensor([[i]]), c1) for i in range(20, 60)], 1)
    for w in (2, 3, 5, 8):
        c2.rollback(0, 20)
        win = torch.cat([m(toks[:, i:i + w], torch.arange(i, min(i + w, 60))[None], c2)
                         for i in range(20, 60, w)], 1)
        assert torch.equal(one, win), f"window {w}"


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3"])
def test_rollback_then_redecode_equals_fresh_decode(preset):
    m = tiny_model(preset, seed=5)
    g = torch.Generator().manual_seed(6)
    prompt = torch.randint(0, m.cfg.vocab_size, (1, 12), generator=g)
    junk = torch.randint(0, m.cfg.vocab_size, (1, 7), generator=g)
    cont = torch.randint(0, m.cfg.vocab_size, (1, 9), generator=g)
    fresh = m.new_cache(1, 64)
    prefill(m, fresh, prompt[0].tolist())
    ref = m(cont, torch.arange(12, 21)[None], fresh)
    c = m.new_cache(1, 64)
    prefill(m, c, prompt[0].tolist())
    m(junk, torch.arange(12, 19)[None], c)  # speculative tokens that get rejected
    c.set_length(0, 19)
    k_before = c.k.data_ptr()
    c.rollback(0, 12)
    assert c.lengths[0] == 12 and c.k.data_ptr() == k_before  # O(1): no reallocation
    out = m(cont, torch.arange(12, 21)[None], c)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError):
        c.rollback(0, 13)  # cannot roll forward


def test_fork_shares_prefix_across_rows():
    m = tiny_model("tiny", seed=7)
    g = torch.Generator().manual_seed(8)
    prompt = torch.randint(0, 256, (1, 15), generator=g)
    c = m.new_cache(4, 64)
    prefill(m, c, prompt[0].tolist(), row=0)
    c.fork(0, [1, 2, 3])
    assert c.lengths == [15, 15, 15, 15]
    nxt = torch.randint(0, 256, (4, 3), generator=g)  # a different branch per row
    out = m(nxt, torch.arange(15, 18).expand(4, 3), c)
    for r in range(4):
        solo = m.new_cache(1, 64)
        prefill(m, solo, prompt[0].tolist())
        assert torch.equal(m(nxt[r:r + 1], torch.arange(15, 18)[None], solo), out[r:r + 1])


def test_batch_rows_match_running_alone():
    """Different prompts in one batch (per-row positions, right padding) decode like alone."""
    m = tiny_model("tiny", seed=9)
    g = torch.Generator().manual_seed(10)
    prompts = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (5, 11, 8)]
    steps = 12
    alone = [greedy_reference(m, p, steps) for p in prompts]
    B = len(prompts)
    L = max(map(len, prompts))
    c = m.new_cache(B, 64)
    toks = torch.zeros(B, L, dtype=torch.long)
    for r, p in enumerate(prompts):
        toks[r, :len(p)] = torch.tensor(p)
    logits = m(toks, torch.arange(L).expand(B, L), c)
    lens = torch.tensor([len(p) for p in prompts])
    nxt = logits[torch.arange(B), lens - 1].argmax(-1)
    outs = [[int(t)] for t in nxt]
    for s in range(steps - 1):
        pos = (lens + s)[:, None]
        logits = m(nxt[:, None], pos, c, kv_len=int(pos.max()) + 1)
        nxt = logits[:, -1].argmax(-1)
        for r in range(B):
            outs[r].append(int(nxt[r]))
    assert outs == alone


@pytest.mark.parametrize("preset", PRESETS)
def test_hf_round_trip_gives_same_logits(tmp_path, preset):
    m = tiny_model(preset, seed=11)
    save_hf(m, str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == m.cfg.n_layers
    cfg2, sd = load_hf_state(str(tmp_path))
    m2 = build_model(cfg2, sd)
    toks = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(12))
    pos = torch.arange(17)[None]
    assert torch.equal(m(toks, pos, m.new_cache(1, 32)), m2(toks, pos, m2.new_cache(1, 32)))


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2", "tiny-qwen3"])
def test_gguf_round_trip_undoes_llama_cpp_permutation(tmp_path, preset):
    m = tiny_model(preset, seed=13)
    f = str(tmp_path / "m.gguf")
    write_gguf(m, f)
    cfg, sd, _ = load_gguf_state(f)
    m2 = build_model(cfg, sd)
    toks = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(14))
    pos = torch.arange(17)[None]
    torch.testing.assert_close(m2(toks, pos, m2.new_cache(1, 32)), m(toks, pos, m.new_cache(1, 32)),
                               rtol=1e-5, atol=1e-5)


def test_gguf_quantized_weights_dequantize(tmp_path):
    m = tiny_model("tiny", seed=15)
    f = str(tmp_path / "q8.gguf")
    write_gguf(m, f, qtype="Q8_0")
    cfg, sd, _ = load_gguf_state(f)
    w = m.state_dict()["layers.0.w2.weight"]
    err = (sd["layers.0.w2.weight"] - w).abs().max().item()
    assert 0 < err < 0.01 * w.abs().max().item()  # lossy but close


def test_missing_file_gives_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))  # a folder without a checkpoint


def test_unknown_architecture_gives_clear_error(tmp_path):
    f = str(tmp_path / "m.gguf")
    write_gguf(tiny_model("tiny"), f, arch="mamba")
    with pytest.raises(ModelLoadError, match="unsupported architecture 'mamba'"):
        load_model(f)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt_neox'"):
        load_model(str(tmp_path / "hf"))


def test_unsupported_quant_type_gives_clear_error(tmp_path):
    f = str(tmp_path / "m.gguf")
    write_gguf(tiny_model("tiny"), f, raw_type_override="IQ2_XXS")
    with pytest.raises(ModelLoadError, match="IQ2_XXS.*not supported"):
        load_gguf_state(f)


def test_not_a_gguf_file_gives_clear_error(tmp_path):
    f = tmp_path / "junk.gguf"
    f.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_model(str(f))


def test_bf16_model_decodes_close_to_fp32():
    m = tiny_model("tiny", seed=16)
    mb = build_model(m.cfg, {k: v for k, v in m.state_dict().items()}, dtype=torch.bfloat16)
    toks = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(17))
    pos = torch.arange(9)[None]
    a = m(toks, pos, m.new_cache(1, 16))
    b = mb(toks, pos, mb.new_cache(1, 16)).float()
    assert b.dtype == torch.float32 and mb.lm_head.weight.dtype == torch.bfloat16
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_fused_rms_norm_is_the_unfused_formula_bit_for_bit():
    from mirror.models.ops import RMSNorm

    g = torch.Generator().manual_seed(11)
    for shape in [(1, 1, 64), (3, 7, 64), (2, 5, 4, 16), (1, 300, 96)]:
        n = RMSNorm(shape[-1], 1e-5)
        n.weight.data = torch.randn(shape[-1], generator=g)
        for scale in (1e-3, 1.0, 100.0):
            x = torch.randn(*shape, generator=g) * scale
            ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * n.weight
            assert torch.equal(n(x), ref)


def test_span_writes_equal_indexed_writes():
    """KVCache.write_span (rows r0..r1 at positions p..p+T-1) writes what write() writes."""
    m = tiny_model("tiny", seed=12)
    a, b = m.new_cache(3, 32), m.new_cache(3, 32)
    g = torch.Generator().manual_seed(13)
    k, v = (torch.randn(2, 5, m.cfg.n_kv_heads, m.cfg.head_dim, generator=g) for _ in range(2))
    a.write_span(1, range(1, 3), 7, k, v)
    b.write(1, torch.tensor([1, 2]), torch.arange(7, 12).expand(2, 5), k, v)
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and a.k.abs().sum() > 0


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3"])
def test_lean_draft_attention_matches_the_grouped_matmuls(preset):
    """A DraftNet's fused SDPA attention (lean) computes what the target's batch-invariant
    grouped matmuls compute, to float rounding: prefill, decode, and scattered positions."""
    from mirror.decoding.drafters.network import DraftNet

    m = tiny_model(preset, seed=14)
    lean, plain = DraftNet.from_model(m), DraftNet.from_model(m)
    plain.lean = False
    ids = torch.randint(1, 256, (2, 9), generator=torch.Generator().manual_seed(15))
    with torch.inference_mode():
        ca, cb = lean.new_cache(2, 32), plain.new_cache(2, 32)
        out = [(n(ids, torch.arange(9).expand(2, 9), c)) for n, c in ((lean, ca), (plain, cb))]
        assert torch.allclose(out[0], out[1], atol=1e-4) and not torch.equal(out[0], out[1])
        pos = torch.tensor([[9, 11], [10, 9]])  # not one span: indexed writes, per-row masks
        out = [n(ids[:, :2], pos, c, kv_len=12) for n, c in ((lean, ca), (plain, cb))]
        assert torch.allclose(out[0], out[1], atol=1e-4)


def _assert_reader_matches_gguf(path):
    import gguf

    from mirror.models.gguf_file import GGUFFile

    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    assert set(ours.fields) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for k, f in ours.fields.items():
        assert f.contents() == ref.fields[k].contents(), k
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.tensor_type == b.tensor_type and list(a.shape) == [int(x) for x in b.shape], a.name
        x = np.asarray(gguf.quants.dequantize(a.data, a.tensor_type), dtype=np.float32).ravel()
        y = np.asarray(gguf.quants.dequantize(b.data, b.tensor_type), dtype=np.float32).ravel()
        assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), a.name  # bit for bit


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_1"])
def test_fast_gguf_reader_matches_the_gguf_package(tmp_path, qtype):
    f = str(tmp_path / f"{qtype}.gguf")
    write_gguf(tiny_model("tiny-qwen2"), f, qtype=qtype)
    _assert_reader_matches_gguf(f)


def test_fast_gguf_reader_matches_the_gguf_package_on_the_bundled_model(bundled):
    _assert_reader_matches_gguf(bundled.path)


def test_truncated_gguf_gives_clear_error(tmp_path):
    src = tmp_path / "m.gguf"
    write_gguf(tiny_model("tiny"), str(src), qtype="Q8_0")
    data = src.read_bytes()
    for cut in (10, 200, len(data) - 64):  # in the header, in the metadata, in the tensor data
        f = tmp_path / f"cut{cut}.gguf"
        f.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match="not a readable GGUF"):
            load_gguf_state(str(f))
