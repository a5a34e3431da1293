"""The onnx target backend (`mirror.models.ort_target.OrtTarget`): real ONNX Runtime sessions
over the model's own weights. Checked: logits agree with the eager model, a verification window
gives bit-identical logits to token-by-token decoding (what lossless speculation needs), greedy
SD / Mirror-SD on it reproduce its own plain decoding on the bundled model, bad calls fail
clearly."""
import numpy as np
import pytest
import torch

from helpers import byte_tokenizer, tiny_model
from mirror.decoding.factory import generate
from mirror.models.ort_target import OrtTarget
from mirror.sampling import SamplingParams
from mirror.spec_config import SpecConfig


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2", "tiny-qwen3"])
@torch.inference_mode()
def test_ort_target_matches_eager_and_windows_equal_single_tokens(preset):
    model = tiny_model(preset)
    ot = OrtTarget(model, splits=[1])
    n = model.cfg.n_layers
    assert ot.bounds == [0, 1, n]
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, model.cfg.vocab_size, (1, 40), generator=g)
    ce, co = model.new_cache(1, 64), ot.new_cache(1, 64)
    le = model(toks[:, :30], torch.arange(30)[None], ce, kv_len=30)
    lo = ot(toks[:, :30], torch.arange(30)[None], co, kv_len=30)
    assert lo.shape == le.shape
    torch.testing.assert_close(lo, le, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(co.k[:, :, :, :30], ce.k[:, :, :, :30], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(co.v[:, :, :, :30], ce.v[:, :, :, :30], atol=1e-4, rtol=1e-4)
    # a 6-token window after the prompt, then the same 6 tokens one by one on a fresh cache
    win = ot(toks[:, 30:36], torch.arange(30, 36)[None], co, kv_len=36)[0]
    c1 = ot.new_cache(1, 64)
    ot(toks[:, :30], torch.arange(30)[None], c1, kv_len=30)
    singles = torch.stack([ot(toks[:, i:i + 1], torch.tensor([[i]]), c1, kv_len=i + 1)[0, 0] for i in range(30, 36)])
    assert torch.equal(win, singles)
    assert torch.equal(co.k[:, :, :, :36], c1.k[:, :, :, :36])
    # layer ranges run segment by segment: prefix then suffix equals the whole forward
    c2 = ot.new_cache(1, 64)
    ot(toks[:, :30], torch.arange(30)[None], c2, kv_len=30)
    h = ot.forward_layers(ot.embed(toks[:, 30:36]), torch.arange(30, 36)[None], c2, 0, 1, kv_len=36)
    h = ot.forward_layers(h, torch.arange(30, 36)[None], c2, 1, n, kv_len=36)
    assert torch.equal(ot.head(h)[0], win)


def test_ort_target_rejects_what_it_cannot_run():
    model = tiny_model("tiny")
    ot = OrtTarget(model)
    cache = ot.new_cache(2, 16)
    x = torch.zeros(1, 2, model.cfg.dim)
    with pytest.raises(ValueError, match="segment boundaries"):
        ot.forward_layers(x, torch.tensor([[0, 1]]), cache, 0, 1)
    with pytest.raises(ValueError, match="one sequence"):
        ot.forward_layers(torch.zeros(2, 2, model.cfg.dim), torch.tensor([[0, 1], [0, 1]]), cache)
    with pytest.raises(ValueError, match="one cache row"):
        ot.forward_layers(x, torch.tensor([[0, 1]]), cache, rows=range(0, 2))
    with pytest.raises(ValueError, match="outside"):
        ot.split_at(model.cfg.n_layers + 1)
    with pytest.raises(ValueError, match="fp32"):
        OrtTarget(tiny_model("tiny").to(torch.bfloat16))


def test_ort_target_sampled_speculation_runs_and_tiny_greedy_matches():
    """Tiny model, byte tokenizer: greedy mirror on the onnx target equals its plain decoding;
    sampling runs through the stochastic rule (exactness of that rule is tested elsewhere)."""
    model, tok = tiny_model("tiny"), byte_tokenizer()
    ot = OrtTarget(model)
    prompt = tok.encode("abcabcabcabc")
    p = SamplingParams(max_new_tokens=24, ignore_eos=True)
    ref = generate(ot, tok, prompt, p).ids
    spec = SpecConfig(method="mirror", draft="ngram", gamma=4, kappa=4)
    out = generate(ot, tok, prompt, p, spec)
    assert out.ids == ref
    assert ot.bounds == [0, spec.resolve_exit_layer(model.cfg.n_layers), model.cfg.n_layers]
    sampled = generate(ot, tok, prompt, SamplingParams(max_new_tokens=16, temperature=0.8, seed=3,
                                                         ignore_eos=True), spec)
    assert len(sampled.ids) == 16


def test_ort_target_bundled_greedy_speculation_is_its_own_plain_decoding(bundled):
    """The real model on ONNX Runtime: vanilla SD and Mirror-SD (n-gram draft + bundled
    datastore, trained exit head, VocabTrim) reproduce the onnx target's plain greedy output."""
    lm = bundled
    ot = OrtTarget(lm.model, splits=[SpecConfig().resolve_exit_layer(lm.model.cfg.n_layers)])
    prompt = lm.tokenizer.encode_chat([{"role": "user", "content": "List three uses of copper."}])
    p = SamplingParams(max_new_tokens=40)
    ref = generate(ot, lm.tokenizer, prompt, p)
    assert len(ref.ids) > 10
    eager = generate(lm.model, lm.tokenizer, prompt, p)
    assert ref.ids[:8] == eager.ids[:8], (ref.text, eager.text)  # same model, other kernels
    for spec in (SpecConfig(method="sd", draft="ngram", ngram_datastore="bundled"),
                 SpecConfig(method="mirror", draft="ngram", ngram_datastore="bundled", exit_head="bundled",
                            exit_trim="bundled"),
                 SpecConfig(method="mirror", draft="ngram", ngram_datastore="bundled", exit_head="bundled",
                            exit_trim="bundled", exit_quant="int8"),
                 SpecConfig(method="mirror", draft="ngram", ngram_datastore="bundled", exit_head="bundled",
                            exit_trim="bundled", exit_quant="int8", verify_cut=2)):
        out = generate(ot, lm.tokenizer, prompt, p, spec)
        assert out.ids == ref.ids, (spec.method, out.text, ref.text)
        assert out.metrics.target_steps < len(ref.ids)  # it did speculate
        assert (out.metrics.cut_tokens > 0) == bool(spec.verify_cut)  # the cut suffix ran (and only then)


def test_host_threads_sets_and_restores_torch_threads():
    from mirror.models.ort_target import host_threads

    old = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with host_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("a failed call restores the threads too")
    assert torch.get_num_threads() == old


def test_draft_sessions_after_an_onnx_target_join_its_thread_pool(tmp_path):
    """An onnx target makes ONNX Runtime's thread pool process-wide; ONNX Runtime then refuses
    sessions with their own threads, so the ORT draft's sessions (created later, in the same
    process) must join it. Run in a fresh interpreter: the pool is per process."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from helpers import tiny_model
        from mirror.decoding.drafters.network import DraftNet
        from mirror.models import ort_target
        from mirror.onnx.export import export_draft
        from mirror.onnx.runtime import OrtDraftNet
        model = tiny_model("tiny")
        ot = ort_target.OrtTarget(model)
        assert ot.pool.startswith("shared"), ot.pool
        export_draft(DraftNet.self_draft(model, 1), r"%s", target_cfg=model.cfg, rows=2, step_width=4,
                     max_len=32)
        net = OrtDraftNet(r"%s", target_cfg=model.cfg)
        cache = net.new_cache(1, 32)
        out = net(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], cache, kv_len=3, last_only=True)
        print("ok", tuple(out.shape))
    """ % (tmp_path, tmp_path))
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ok" in r.stdout


@pytest.mark.parametrize("trained", [False, True])
@torch.inference_mode()
def test_trimmed_exit_head_graph_matches_pytorch_and_is_reused(trained):
    """A trimmed early-exit head on the onnx target runs as its own graph: same top-kappa ids
    and log-probs as EarlyExit's PyTorch path (with and without a trained low-rank update); one
    session per configuration, kept and reused, at most EXIT_HEADS_KEPT of them."""
    from mirror.decoding.artifacts import ExitHead
    from mirror.decoding.target import EarlyExit

    model = tiny_model("tiny")
    ot = OrtTarget(model)
    g = torch.Generator().manual_seed(1)
    keep = torch.randperm(model.cfg.vocab_size, generator=g)[:100].sort().values
    head = None
    if trained:
        head = ExitHead(model, 4)
        head.down.copy_(torch.randn(head.down.shape, generator=g) * 0.3)
        head.up.copy_(torch.randn(head.up.shape, generator=g) * 0.3)
    eager, graph = EarlyExit(model, 5, head, keep), EarlyExit(ot, 5, head, keep)
    assert eager.graph is None and graph.graph is not None
    h = torch.randn(6, model.cfg.dim, generator=g) * 2
    (ie, le), (ig, lg) = eager(h), graph(h)
    assert ig.shape == (6, 5) and ig.dtype == torch.int64
    assert torch.equal(ig, ie)
    assert set(ig.flatten().tolist()) <= set(keep.tolist())
    torch.testing.assert_close(lg, le, atol=1e-4, rtol=1e-4)
    assert ot.exit_head(keep, 5, head) is graph.graph  # same configuration: same session
    assert ot.exit_head(keep, 3, head) is not graph.graph
    for k in range(1, OrtTarget.EXIT_HEADS_KEPT + 2):
        ot.exit_head(keep, k, head)
    assert len(ot._exit_heads) == OrtTarget.EXIT_HEADS_KEPT


@torch.inference_mode()
def test_an_int8_exit_head_ranks_like_the_fp32_one_and_only_on_a_graph(caplog):
    """exit_quant="int8": the trimmed head's rows as 8-bit blocks (MatMulNBits); its blocks
    reconstruct the rows within half a step of their scale, its top-kappa are trim-set ids and
    mostly the fp32 graph's; a target without graphs keeps the fp32 head and says so."""
    import numpy as np

    from mirror.decoding.target import EarlyExit
    from mirror.models.ort_target import int8_blocks

    model = tiny_model("tiny")
    ot = OrtTarget(model)
    g = torch.Generator().manual_seed(2)
    keep = torch.randperm(model.cfg.vocab_size, generator=g)[:120].sort().values
    w = model.lm_head.weight.detach().float()[keep].numpy()
    codes, scales = int8_blocks(w)
    K = w.shape[1]
    back = ((codes.astype(np.float32) - 128) * scales[..., None]).reshape(len(keep), -1)[:, :K]
    step = np.repeat(scales, codes.shape[-1], axis=1)[:, :K]
    assert np.all(np.abs(back - w) <= 0.5 * step + 1e-7)
    fp, q8 = EarlyExit(ot, 5, None, keep), EarlyExit(ot, 5, None, keep, quant="int8")
    assert q8.graph is not fp.graph
    h = torch.randn(16, model.cfg.dim, generator=g) * 2
    (i_fp, _), (i_q, l_q) = fp(h), q8(h)
    assert i_q.shape == (16, 5) and set(i_q.flatten().tolist()) <= set(keep.tolist())
    assert bool((l_q <= 0).all())
    shared = sum(len(set(a) & set(b)) for a, b in zip(i_fp.tolist(), i_q.tolist())) / i_fp.numel()
    assert shared >= 0.8, shared
    assert (i_q[:, 0] == i_fp[:, 0]).float().mean() >= 0.8
    eager = EarlyExit(model, 5, None, keep, quant="int8")
    assert eager.graph is None and "keeps the fp32 head" in caplog.text
    assert torch.equal(eager(h)[0], EarlyExit(model, 5, None, keep)(h)[0])
    with pytest.raises(ValueError, match="exit_trim"):
        SpecConfig(method="mirror", exit_quant="int8")
    with pytest.raises(ValueError, match="unknown exit_quant"):
        SpecConfig(method="mirror", exit_trim="bundled", exit_quant="int4")


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2"])
@torch.inference_mode()
def test_attending_over_a_cache_slice_is_bit_identical_to_the_whole_row(preset, monkeypatch):
    """`OrtTarget` attends over only the cache positions a call can see when that is cheaper
    (prefill chunks, a cache at most half used). Exactness then rests on ONNX Runtime's results
    not depending on how many masked positions trail: run the same prefill and decode steps with
    the slice forced off and forced on and compare every bit of the logits and the cache."""
    model = tiny_model(preset)
    ot = OrtTarget(model, splits=[1])
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, model.cfg.vocab_size, (1, 90), generator=g)

    def run(attended):
        monkeypatch.setattr(OrtTarget, "_attended", attended)
        cache = ot.new_cache(1, 203)  # an odd length, far longer than what is used
        outs = [ot(toks[:, :41], torch.arange(41)[None], cache, kv_len=41)]  # a prefill chunk
        outs += [ot(toks[:, i:i + 1], torch.tensor([[i]]), cache) for i in range(41, 47)]
        outs.append(ot(toks[:, 47:53], torch.arange(47, 53)[None], cache))  # a verify window
        outs.append(ot(toks[:, 53:90], torch.arange(53, 90)[None], cache))  # a second chunk
        return outs, cache

    seen = []
    whole, cw = run(lambda self, max_len, needed, rows: seen.append((max_len, needed)) or max_len)
    part, cp = run(lambda self, max_len, needed, rows: needed)
    assert seen[0] == (203, 41) and seen[-1] == (203, 90)
    for a, b in zip(whole, part):
        assert torch.equal(a, b)
    assert torch.equal(cw.k, cp.k) and torch.equal(cw.v, cp.v)
    # the default rule: a prefill chunk or a cache at most half used takes the slice
    monkeypatch.undo()
    assert ot._attended(203, 41, 41) == 41 and ot._attended(203, 90, 1) == 90
    assert ot._attended(203, 150, 6) == 203 and ot._attended(203, 203, 64) == 203


def _fresh(code: str) -> str:
    """Run `code` in a fresh interpreter (ONNX Runtime's thread pools are per process)."""
    import os
    import subprocess
    import sys
    import textwrap

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2", "tiny-qwen3"])
@torch.inference_mode()
def test_the_fused_prefill_graph_matches_the_eager_model_chunk_by_chunk(preset):
    """`segment_graph(..., attention="fused")` (the prefill sessions' graph: GroupQueryAttention
    over the positions before the chunk) gives the eager model's hidden states and K/V for a
    prompt in two chunks - the second attending over the first - with q/k norms (qwen3) and
    biases (qwen2); a bad attention name is refused."""
    from mirror.models.ort_target import _session, segment_graph

    model = tiny_model(preset)
    cfg = model.cfg
    n = cfg.n_layers
    sess = _session(segment_graph(model, 0, n, "fused"), 1)
    toks = torch.randint(0, cfg.vocab_size, (1, 50), generator=torch.Generator().manual_seed(2))
    ce = model.new_cache(1, 64)
    k_past = torch.zeros(n, 1, cfg.n_kv_heads, 0, cfg.head_dim)
    v_past = k_past.clone()
    for s, e in ((0, 30), (30, 50)):
        he = model.forward_layers(model.embed(toks[:, s:e]), torch.arange(s, e)[None], ce, kv_len=e)
        feeds = {"h": model.embed(toks[:, s:e]).float().contiguous().numpy(),
                 "position_ids": torch.arange(s, e)[None].numpy(),
                 "seqlens_k": np.array([e - 1], np.int32), "total_len": np.array(e, np.int32)}
        for i in range(n):
            feeds[f"k_cache_{i}"] = np.ascontiguousarray(k_past[i].numpy())
            feeds[f"v_cache_{i}"] = np.ascontiguousarray(v_past[i].numpy())
        h, k_new, v_new = (torch.from_numpy(a) for a in sess.run(None, feeds))
        torch.testing.assert_close(h, he, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(k_new, ce.k[:, 0, :, s:e], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v_new, ce.v[:, 0, :, s:e], atol=1e-4, rtol=1e-4)
        k_past, v_past = torch.cat([k_past, k_new[:, None]], 3), torch.cat([v_past, v_new[:, None]], 3)
    with pytest.raises(ValueError, match="attention must be one of"):
        segment_graph(model, 0, n, "flash")
    with pytest.raises(ValueError, match="prefill_attention must be one of"):
        OrtTarget(model, prefill_attention="flash")


@pytest.mark.skipif(len(__import__("os").sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_prefill_on_more_cores_takes_prompt_chunks_only():
    """target.prefill_cores: a worker decoding on one core prefills on two (a second session
    set, one pool thread pinned to the other core). Prompt chunks (spans of >= PREFILL_ROWS new
    tokens) take it; verify windows and other calls stay on the one-thread sessions. With
    prefill_attention "materialized" it gives the very logits and K/V the one-thread sessions
    give; "fused" (the default) the same up to float rounding."""
    out = _fresh("""
        import os, torch
        from helpers import tiny_model
        from mirror.models.ort_target import OrtTarget
        from mirror.decoding.ar import prefill
        c0, c1 = sorted(os.sched_getaffinity(0))[:2]
        os.sched_setaffinity(0, {c0})
        torch.set_num_threads(1)
        model = tiny_model("tiny")
        wides = {a: OrtTarget(model, splits=[1], threads=1, prefill_cores=[c0, c1], prefill_attention=a)
                 for a in ("materialized", "fused")}  # (first: before any shared pool)
        narrow = OrtTarget(model, splits=[1], threads=1)
        assert narrow.prefill_threads == 1 and not narrow.prefill_segments
        ids = torch.randint(0, model.cfg.vocab_size, (200,), generator=torch.Generator().manual_seed(0)).tolist()
        cn = model.new_cache(1, 256)
        ln = prefill(narrow, cn, ids[:90])
        k90, v90 = cn.k.clone(), cn.v.clone()
        win = torch.tensor([ids[90:96]]); pos = torch.arange(90, 96)[None]
        lwn = narrow(win, pos, cn, kv_len=96)
        chunk, cpos = torch.tensor([ids[96:170]]), torch.arange(96, 170)[None]
        lcn = narrow(chunk, cpos, cn, kv_len=170)
        for attention, wide in wides.items():
            assert wide.prefill_threads == 2 and "prefill 2 threads" in wide.pool, wide.pool
            assert set(wide.prefill_segments) == set(wide.segments) == {(0, 1), (1, model.cfg.n_layers)}
            calls = {"wide": 0}
            for key, sess in list(wide.prefill_segments.items()):
                class Counted:
                    def __init__(self, s): self.s = s
                    def run(self, *a):
                        calls["wide"] += 1
                        return self.s.run(*a)
                wide.prefill_segments[key] = Counted(sess)
            cw = model.new_cache(1, 256)
            lw = prefill(wide, cw, ids[:90])
            assert calls["wide"] == 2, calls  # one chunk, two segments
            if attention == "materialized":
                assert torch.equal(lw, ln) and torch.equal(cw.k, k90) and torch.equal(cw.v, v90)
            else:
                assert not torch.equal(cw.k, k90)  # another kernel ...
                torch.testing.assert_close(lw, ln, atol=2e-4, rtol=1e-4)  # ... the same values
                torch.testing.assert_close(cw.k, k90, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(cw.v, v90, atol=1e-4, rtol=1e-4)
                cw.k.copy_(k90); cw.v.copy_(v90)  # (from here on: the same cache, the same results)
            assert torch.equal(wide(win, pos, cw, kv_len=96), lwn)
            # a second prompt chunk after the cached prefix: the prefill sessions again
            lc = wide(chunk, cpos, cw, kv_len=170)
            assert calls["wide"] == 4, calls
            if attention == "materialized":
                assert torch.equal(lc, lcn)
            else:
                torch.testing.assert_close(lc, lcn, atol=2e-4, rtol=1e-4)
            # not a prompt chunk: a 6-token window, 70 rows that leave the last position unseen
            # (kv_len < their end), 70 rows at scattered positions - all on the one-thread sessions
            wide(chunk[:, :70], torch.arange(170, 240)[None], cw, kv_len=239)
            wide(chunk[:, :70], torch.arange(100, 240, 2)[None], cw)
            assert calls["wide"] == 4, calls
            print(attention, "ok")
    """)
    assert "materialized ok" in out and "fused ok" in out


def test_prefill_cores_are_ignored_beside_a_shared_pool():
    """Once the process has ONNX Runtime's shared pool (an onnx target made first), sessions of
    their own are refused: prefill_cores is then ignored with a warning, not an error."""
    out = _fresh("""
        import logging, os, torch
        logging.basicConfig(level=logging.WARNING)
        from helpers import tiny_model
        from mirror.models.ort_target import OrtTarget
        model = tiny_model("tiny")
        first = OrtTarget(model, threads=1)
        assert first.pool.startswith("shared"), first.pool
        c = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {c})
        again = OrtTarget(model, threads=1, prefill_cores=list(range(os.cpu_count())))
        assert again.prefill_threads == 1 and not again.prefill_segments
        print("ok")
    """)
    assert "ok" in out


@pytest.mark.skipif(len(__import__("os").sched_getaffinity(0)) < 2, reason="needs two cores")
def test_prefill_cost_benchmark(tmp_path):
    """benchmarks/prefill_cost.py (in a fresh interpreter: it builds prefill sessions) times the
    four prefill paths on a model file and checks their logits against each other: the
    materialized prefill sessions and the one-core target give the same bits, the fused kernel and
    the eager model the same values; bad lengths are refused with a message."""
    import json
    import os
    import subprocess
    import sys

    from helpers import write_gguf

    path, out = str(tmp_path / "tiny.gguf"), tmp_path / "pc.json"
    write_gguf(tiny_model("tiny"), path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "benchmarks.prefill_cost", "--model", path]
    r = subprocess.run(cmd + ["--lengths", "70", "300", "--reps", "2", "--out", str(out)], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    got = {(x["path"], x["tokens"]): x for x in rows}
    assert set(got) == {(p, n) for p in ("onnx fused", "onnx materialized", "onnx one core", "eager")
                        for n in (70, 300)}
    for (p, n), x in got.items():
        assert len(x["times_s"]) == 2 and x["median_s"] > 0 and x["linear_gflops"] > 0, x
        assert x["same_argmax"], x
        assert x["max_abs_diff"] == 0.0 if p in ("onnx materialized", "onnx one core") else x["max_abs_diff"] < 1e-3, x
    assert any(x["max_abs_diff"] > 0 for (p, _), x in got.items() if p == "onnx fused")  # another kernel
    assert "| onnx fused | 300 |" in r.stdout
    bad = subprocess.run(cmd + ["--lengths", "0"], cwd=root, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "a prompt must have 1 to 512 tokens" in bad.stderr
