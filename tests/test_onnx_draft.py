"""ONNX Runtime draft path on the real bundled model: export (through the CLI), graph parity
with the PyTorch draft, lossless Mirror-SD with the ORT draft, provider fallback reporting,
metadata round trip. Exports once per module into temporary folders: a 3-layer self-draft with
a VocabTrim head through `mirror export-draft` (max_len 512), and a 2-layer streaming self-draft
with the full head."""
import json
import os
import shutil
import warnings

import numpy as np
import onnx
import pytest
import torch

from benchmarks.specbench import category, default_questions_path, load_questions, select
from mirror.cli import main as cli_main
from mirror.decoding.drafters.network import DraftNet
from mirror.decoding.drafters.streaming import attach_streams
from mirror.decoding.drafters.vocab_trim import VocabTrim
from mirror.decoding.factory import generate
from mirror.models import PRESETS
from mirror.onnx.export import check_net, config_fingerprint, export_draft, read_metadata
from mirror.onnx.providers import (ProviderFallbackError, ProviderFallbackWarning, parse_providers,
                                   provider_status)
from mirror.onnx.runtime import OrtDraftNet, plan_chunks
from mirror.sampling import SamplingParams
from mirror.spec_config import SpecConfig

K, MAX_LEN, ROWS, WIDTH, KEEP = 3, 512, 8, 16, 8192
# fp32 ORT vs fp32 PyTorch: same math, different kernels and reduction orders. Logits of the
# bundled model reach |x| ~ 30; measured max abs differences are ~7e-5.
TOL = 2e-4
QNN = {"name": "QNNExecutionProvider", "options": {"backend_path": "libQnnHtp.so"}}


@pytest.fixture(scope="module")
def trim_file(tmp_path_factory):
    """A VocabTrim set: the 8192 lowest ids (BPE ids roughly follow merge order, so frequency)."""
    path = str(tmp_path_factory.mktemp("trim") / "trim.json")
    VocabTrim(range(KEEP), 49152).save(path)
    return path


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, trim_file):
    d = str(tmp_path_factory.mktemp("ort_self3"))
    assert cli_main(["export-draft", "--draft", "self", "--draft-layers", str(K), "--vocab-trim", trim_file,
                     "--max-len", str(MAX_LEN), "--rows", str(ROWS), "--step-width", str(WIDTH), "--out", d]) == 0
    return d


@pytest.fixture(scope="module")
def ort_net(export_dir, bundled):
    return OrtDraftNet(export_dir, target_cfg=bundled.model.cfg)


@pytest.fixture(scope="module")
def torch_net(bundled, trim_file):
    return DraftNet.self_draft(bundled.model, K, keep_ids=VocabTrim.load(trim_file).keep_ids)


@pytest.fixture(scope="module")
def streaming_pair(bundled, tmp_path_factory):
    """A 2-layer streaming self-draft (full head) with non-zero stream embeddings."""
    net = DraftNet.self_draft(bundled.model, 2)
    attach_streams(net, None, n_streams=2, n_layers=1)
    with torch.no_grad():
        net.streams.emb.copy_(0.05 * torch.randn(net.streams.emb.shape, generator=torch.Generator().manual_seed(1)))
    d = str(tmp_path_factory.mktemp("ort_stream"))
    export_draft(net, d, target_cfg=bundled.model.cfg, kind="streaming", rows=4, step_width=1, max_len=256)
    return net, OrtDraftNet(d, target_cfg=bundled.model.cfg)


def _tokens(n, seed=0):
    return torch.randint(0, 49152, (1, n), generator=torch.Generator().manual_seed(seed))


def _maxdiff(a, b) -> float:
    return float((a - b).abs().max())


# --- parity -------------------------------------------------------------------------------
@torch.inference_mode()
def test_step_graph_matches_torch_draft(ort_net, torch_net):
    toks = _tokens(48)
    c1, c2 = torch_net.new_cache(1, MAX_LEN), ort_net.new_cache(1, MAX_LEN)
    # 37 tokens: several padded chunk calls; then single steps; then a 3-token catch-up
    a = torch_net(toks[:, :37], torch.arange(37)[None], c1, kv_len=37, last_only=True)
    b = ort_net(toks[:, :37], torch.arange(37)[None], c2, kv_len=37, last_only=True)
    assert b.shape == a.shape == (1, 1, KEEP)
    assert _maxdiff(a, b) <= TOL
    for i in range(37, 41):
        a = torch_net(toks[:, i:i + 1], torch.tensor([[i]]), c1, kv_len=i + 1)
        b = ort_net(toks[:, i:i + 1], torch.tensor([[i]]), c2, kv_len=i + 1)
        assert _maxdiff(a, b) <= TOL
    a = torch_net(toks[:, 41:44], torch.arange(41, 44)[None], c1, kv_len=44)  # all positions' logits
    b = ort_net(toks[:, 41:44], torch.arange(41, 44)[None], c2, kv_len=44)
    assert b.shape == a.shape == (1, 3, KEEP)
    assert _maxdiff(a, b) <= TOL
    assert _maxdiff(c1.k[:, :, :, :44], c2.k[:, :, :, :44]) <= 1e-4
    assert _maxdiff(c1.v[:, :, :, :44], c2.v[:, :, :, :44]) <= 1e-4
    # the logits are those of the right token: a neighbouring position differs by far more
    assert _maxdiff(a[0, 1], b[0, 2]) > 100 * TOL
    # VocabTrim: draft ids and probabilities map back onto the target vocabulary
    assert torch.equal(ort_net.keep_ids, torch.arange(KEEP)) and ort_net.vocab == KEEP
    assert int(ort_net.to_full(torch.tensor([KEEP - 1]))) == KEEP - 1
    probs = torch.softmax(b[0], -1)
    full = ort_net.full_probs(probs, 49152)
    assert full.shape == (3, 49152) and torch.equal(full[:, :KEEP], probs) and not full[:, KEEP:].any()


@torch.inference_mode()
def test_branch_graph_matches_torch_draft(ort_net, torch_net):
    toks = _tokens(80, seed=1)
    c1, c2 = torch_net.new_cache(1, MAX_LEN), ort_net.new_cache(1, MAX_LEN)
    torch_net(toks[:, :60], torch.arange(60)[None], c1, kv_len=60, last_only=True)
    ort_net(toks[:, :60], torch.arange(60)[None], c2, kv_len=60, last_only=True)
    b1, b2 = torch_net.new_branch_buffer(c1, 16, 8), ort_net.new_branch_buffer(c2, 16, 8)
    prefix = torch.tensor([55, 57, 60, 58, 60, 56])  # rows 5..10: across two groups of R = 8
    pos = prefix[:, None].clone()
    for step in range(4):
        tk = toks[0, 60 + step:66 + step][:, None].contiguous()
        a = torch_net.forward_branch(tk, pos, c1, 0, prefix, b1, int(prefix.max()), row0=5)
        b = ort_net.forward_branch(tk, pos, c2, 0, prefix, b2, int(prefix.max()), row0=5)
        assert b.shape == a.shape == (6, KEEP)
        assert _maxdiff(a, b) <= TOL
        pos = pos + 1
    # a hit: row 7 (prefix 60) becomes the main state; both continue identically
    b1.install(7, c1, 0, 60, 3)
    b2.install(7, c2, 0, 60, 3)
    a = torch_net(toks[:, 70:71], torch.tensor([[63]]), c1, kv_len=64)
    b = ort_net(toks[:, 70:71], torch.tensor([[63]]), c2, kv_len=64)
    assert _maxdiff(a, b) <= TOL


@torch.inference_mode()
def test_stream_graph_matches_torch_draft(streaming_pair):
    net, ort = streaming_pair
    V = 49152
    assert ort.vocab == V and ort.keep_ids is None and ort.streams.n_streams == 2
    toks = _tokens(30, seed=2)
    c1, c2 = net.new_cache(1, 256), ort.new_cache(1, 256)
    a = net(toks[:, :20], torch.arange(20)[None], c1, kv_len=20, last_only=True)
    b = ort(toks[:, :20], torch.arange(20)[None], c2, kv_len=20, last_only=True)
    assert b.shape == (1, 1, V) and _maxdiff(a, b) <= TOL
    for start, n in ((20, 1), (21, 3), (24, 2)):  # padded (n < 3) and full passes
        tk, pos = toks[:, start:start + n], torch.arange(start, start + n)[None]
        ma, sa = net.forward_streams(tk, pos, c1, kv_len=start + n)
        mb, sb = ort.forward_streams(tk, pos, c2, kv_len=start + n)
        assert mb.shape == ma.shape == (n, V) and sb.shape == sa.shape == (2, V)
        assert _maxdiff(ma, mb) <= TOL and _maxdiff(sa, sb) <= TOL
    assert _maxdiff(c1.k[:, :, :, :26], c2.k[:, :, :, :26]) <= 1e-4


# --- lossless end to end ------------------------------------------------------------------
QPATH = default_questions_path()


@pytest.mark.skipif(QPATH is None, reason="Spec-Bench is absent (../shared/specbench/question.jsonl)")
def test_greedy_mirror_with_ort_draft_equals_plain_decoding(bundled, export_dir, trim_file):
    cats = ("mt_bench", "translation", "qa")
    qs = [q for q in select(load_questions(QPATH), 2) if category(q) in cats]
    assert len(qs) == 6
    tok, model = bundled.tokenizer, bundled.model
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    kw = dict(method="mirror", draft="self", draft_layers=K, vocab_trim=trim_file, gamma=3, kappa=4, budget=8,
              branch_batch=ROWS)
    ort_spec = SpecConfig(draft_backend="onnx", onnx_dir=export_dir, **kw)
    hits = drafted = 0
    for i, q in enumerate(qs):
        ids = tok.encode_chat([{"role": "user", "content": q["turns"][0]}])
        ref = generate(model, tok, ids, params).ids
        res = generate(model, tok, ids, params, ort_spec)
        assert res.ids == ref
        hits, drafted = hits + res.metrics.hits, drafted + res.metrics.drafted_tokens
        if i < 2:  # the ORT draft proposes what the PyTorch draft proposes
            m = generate(model, tok, ids, params, SpecConfig(**kw)).metrics
            assert (res.metrics.accepted_tokens, res.metrics.hits) == (m.accepted_tokens, m.hits)
    assert hits > 0 and drafted > 0


def test_spec_mismatch_with_the_export_is_refused(bundled, export_dir, trim_file):
    meta = read_metadata(export_dir)
    keep = VocabTrim.load(trim_file).keep_ids
    check_net(meta, DraftNet.self_draft(bundled.model, K, keep_ids=keep), "self")
    with pytest.raises(ValueError, match=r"draft layers \[0, 1, 2\] != \[0, 1, 2, 3\]"):
        check_net(meta, DraftNet.self_draft(bundled.model, 4, keep_ids=keep), "self")
    with pytest.raises(ValueError, match="trimmed vocabulary"):
        check_net(meta, DraftNet.self_draft(bundled.model, K), "self")
    with pytest.raises(ValueError, match="kind 'self' != 'streaming'"):
        check_net(meta, DraftNet.self_draft(bundled.model, K, keep_ids=keep), "streaming")
    spec = SpecConfig(method="mirror", draft="self", draft_layers=4, vocab_trim=trim_file, draft_backend="onnx",
                      onnx_dir=export_dir)
    with pytest.raises(ValueError, match="does not match"):
        generate(bundled.model, bundled.tokenizer, [1, 2, 3], SamplingParams(max_new_tokens=4), spec)


# --- providers ----------------------------------------------------------------------------
def test_unavailable_provider_is_reported_and_strict_raises(export_dir, bundled):
    import onnxruntime as ort

    assert "QNNExecutionProvider" not in ort.get_available_providers()  # a CPU build
    with pytest.warns(ProviderFallbackWarning, match="QNNExecutionProvider"):
        net = OrtDraftNet(export_dir, [QNN, "CPUExecutionProvider"])
    st = net.status
    assert st["fallback"] and st["cpu_fallback"] and st["provider"] == "CPUExecutionProvider"
    assert st["requested"][0] == QNN and "QNNExecutionProvider" not in st["available"]
    assert all(p == ["CPUExecutionProvider"] for p in st["graphs"].values())
    with pytest.raises(ProviderFallbackError, match="QNNExecutionProvider"):
        OrtDraftNet(export_dir, [QNN, "CPUExecutionProvider"], strict=True)
    with pytest.raises(ProviderFallbackError):
        OrtDraftNet(export_dir, ["CoreMLExecutionProvider"], strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asking for the CPU and getting it is no fallback
        cpu = OrtDraftNet(export_dir, ["CPUExecutionProvider"], strict=True, intra_threads=1)
    assert not cpu.status["fallback"] and cpu.status["threads"] == {"intra_op": 1, "inter_op": 1}
    spec = SpecConfig(method="mirror", draft="self", draft_layers=K, draft_backend="onnx", onnx_dir=export_dir,
                      onnx_providers=[QNN], onnx_strict=True)  # strict: no check of the spec is reached
    with pytest.raises(ProviderFallbackError):
        generate(bundled.model, bundled.tokenizer, [1, 2, 3], SamplingParams(max_new_tokens=4), spec)


def test_provider_list_parsing_and_status():
    reqs = parse_providers([QNN, "CUDAExecutionProvider"])
    assert [r.name for r in reqs] == ["QNNExecutionProvider", "CUDAExecutionProvider"]
    assert reqs[0].options == QNN["options"] and reqs[1].options == {}
    for bad in ([{"nam": "x"}], ["CPU"], ["CPUExecutionProvider", "CPUExecutionProvider"], [], [3]):
        with pytest.raises(ValueError):
            parse_providers(bad)
    ok = provider_status(reqs, ["CUDAExecutionProvider", "CPUExecutionProvider"],
                         ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert ok["fallback"] and not ok["cpu_fallback"] and ok["unavailable"] == ["QNNExecutionProvider"]
    ok = provider_status(reqs[1:], ["CUDAExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert not ok["fallback"]
    with pytest.raises(ValueError):
        SpecConfig(draft_backend="onnx", onnx_providers=[{"name": "QNNExecutionProvider", "opts": {}}])
    SpecConfig(draft_backend="onnx", draft="ngram")  # a deployment-wide backend; n-gram drafts ignore it


# --- metadata -----------------------------------------------------------------------------
def test_metadata_round_trip(export_dir, bundled, ort_net, tmp_path):
    meta = read_metadata(export_dir)
    sh = meta["shapes"]
    assert (sh["rows"], sh["step_widths"], sh["max_len"], sh["vocab"]) == (ROWS, [1, 8, WIDTH], MAX_LEN, KEEP)
    assert meta["draft"]["kind"] == "self" and meta["draft"]["layers"] == K and meta["draft"]["cache_layers"] == K
    assert meta["vocab_trim"]["size"] == KEEP and meta["dtype"] == "float32" and meta["opset"] >= 17
    assert VocabTrim.load(f"{export_dir}/{meta['vocab_trim']['file']}").keep_ids.tolist() == list(range(KEEP))
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["onnx"] == onnx.__version__
    assert meta["target"] == config_fingerprint(bundled.model.cfg)
    assert set(meta["graphs"]) == {"step_t1", "step_t8", f"step_t{WIDTH}", f"branch_r{ROWS}"}
    assert set(ort_net.status["step_call_ms"]) == {"1", "8", str(WIDTH)}  # timed at load
    assert all(v > 0 for v in ort_net.status["step_call_ms"].values())
    for name, g in meta["graphs"].items():  # recorded signatures are the files' own
        m = onnx.load(f"{export_dir}/{g['file']}", load_external_data=False)
        for v in m.graph.input:
            assert [d.dim_value for d in v.type.tensor_type.shape.dim] == g["inputs"][v.name]["shape"]
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer
                   if len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 4096)
    inputs = meta["graphs"]["step_t1"]["inputs"]
    assert [n for n in inputs if n.startswith("k_cache")] == [f"k_cache_{i}" for i in range(K)]
    assert inputs["k_cache_0"]["shape"] == [1, 3, MAX_LEN, 64]  # layer i of the [K, 1, 3, S, 64] host cache
    assert tuple(ort_net.new_cache(1, 100).k.shape) == (K, 1, 3, MAX_LEN, 64)
    assert meta["graphs"][f"branch_r{ROWS}"]["inputs"]["k_own_0"]["shape"] == [ROWS, 3, 18, 64]
    # refusals: a different target, too long a context, a foreign or newer metadata file
    with pytest.raises(ValueError, match="exported for target"):
        OrtDraftNet(export_dir, target_cfg=PRESETS["tiny"])
    with pytest.raises(ValueError, match="--max-len"):
        ort_net.new_cache(1, MAX_LEN + 1)
    with pytest.raises(ValueError, match="--branch-slots"):
        ort_net.new_branch_buffer(ort_net.new_cache(1, 64), 8, 19)
    shutil.copy(f"{export_dir}/draft.json", tmp_path / "draft.json")
    for key, val, msg in (("version", 99, "version 99"), ("format", "x", "not a mirror")):
        d = json.loads((tmp_path / "draft.json").read_text())
        d[key] = val
        (tmp_path / "draft.json").write_text(json.dumps(d))
        with pytest.raises(ValueError, match=msg):
            read_metadata(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="export-draft"):
        read_metadata(str(tmp_path / "nowhere"))


def test_chunk_plan_prefers_few_padded_calls():
    assert plan_chunks(1, [1, 16], 32) == [1]
    assert plan_chunks(3, [1, 16], 32) == [16]  # one padded call beats three
    assert plan_chunks(37, [1, 16], 32) == [16, 16, 16]
    assert plan_chunks(33, [1, 16], 32) == [16, 16, 1]
    assert sum(plan_chunks(100, [1, 8, 64], 32)) >= 100
    assert plan_chunks(5, [1, 16], 0.0) == [1] * 5  # free calls: no padding
    assert np.all(np.array(plan_chunks(200, [1, 16], 32)) > 0)
    # measured call times (ms, as on this CPU): a window goes into the window-sized graph, two
    # tokens into one-token calls, a prompt into wide chunks
    ms = {1: 10.5, 8: 24.0, 64: 75.0}
    assert plan_chunks(7, [1, 8, 64], ms) == [8]
    assert plan_chunks(2, [1, 8, 64], ms) == [1, 1]
    assert sorted(plan_chunks(130, [1, 8, 64], ms)) == [1, 1, 64, 64]
    assert sorted(plan_chunks(131, [1, 8, 64], ms)) == [8, 64, 64]


# --- every draft kind, on a tiny seeded target (fast) ---------------------------------------
def _tiny_adapter_artifact(target, path, k=2):
    from mirror.decoding.artifacts import save_artifact, target_fingerprint
    from mirror.decoding.drafters.network import make_adapter

    adapter = make_adapter(target.cfg, k)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a trained-looking adapter: not the identity it starts as
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    save_artifact(path, {f"adapter.{n}": t for n, t in adapter.state_dict().items()},
                  {"layers": k, "adapter": {"ffn_dim": adapter.cfg.ffn_dim}, "target": target_fingerprint(target)})


@pytest.mark.parametrize("kind,pre_budget", [("adapter", 0), ("model", 0), ("model", 5)])
def test_adapter_and_separate_model_drafts_are_exported_and_lossless(kind, pre_budget, tmp_path):
    """pre_budget 5 with 4-row branch calls: pre-signal rows and the signal's rows share and
    cross the row groups; the ORT draft must still propose exactly what the PyTorch one does."""
    from helpers import byte_tokenizer, tiny_model
    from mirror.decoding.factory import build_draft_net
    from mirror.models import save_hf
    from mirror.onnx.export import export_from_spec

    target, tok = tiny_model("tiny", seed=0), byte_tokenizer()
    kw = dict(method="mirror", gamma=3, kappa=4, budget=8, branch_batch=8, pre_budget=pre_budget)
    if kind == "adapter":
        _tiny_adapter_artifact(target, str(tmp_path / "art.safetensors"))
        kw.update(draft="self", adapter=str(tmp_path / "art.safetensors"))
    else:
        save_hf(tiny_model("tiny", seed=99, n_layers=2), str(tmp_path / "small"))
        kw.update(draft="model", draft_model=str(tmp_path / "small"))
    spec = SpecConfig(**kw)
    d = str(tmp_path / "onnx")
    meta = export_from_spec(target, spec, d, rows=4, step_width=8, max_len=128)
    assert meta["draft"]["cache_layers"] == (3 if kind == "adapter" else 2)
    assert ("sha256" in meta["draft"]["adapter"]) if kind == "adapter" else meta["draft"]["draft_model"]
    tnet, onet = build_draft_net(target, spec, spec.draft), OrtDraftNet(d, target_cfg=target.cfg)
    toks = torch.randint(1, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        c1, c2 = tnet.new_cache(1, 128), onet.new_cache(1, 128)
        a = tnet(toks, torch.arange(24)[None], c1, kv_len=24, last_only=True)
        b = onet(toks, torch.arange(24)[None], c2, kv_len=24, last_only=True)
    assert _maxdiff(a, b) <= 1e-4
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    ort_spec = SpecConfig(draft_backend="onnx", onnx_dir=d, **kw)
    for prompt in ([5, 6, 7, 8], [3, 1, 4, 1, 5, 9, 2, 6], list(b"hello world")):
        res = generate(target, tok, prompt, params, ort_spec)
        assert res.ids == generate(target, tok, prompt, params).ids
        ref = generate(target, tok, prompt, params, SpecConfig(**kw)).metrics
        assert (res.metrics.accepted_tokens, res.metrics.hits) == (ref.accepted_tokens, ref.hits)
        assert res.metrics.extra.get("pre_hits") == ref.extra.get("pre_hits")
        assert (res.metrics.extra.get("pre_branches", 0) > 0) == (pre_budget > 0)


def test_streaming_draft_is_exported_on_first_use_and_reused(tmp_path, monkeypatch):
    from helpers import byte_tokenizer, tiny_model

    monkeypatch.setenv("MIRROR_ONNX_CACHE", str(tmp_path / "cache"))
    target, tok = tiny_model("tiny", seed=1), byte_tokenizer()
    kw = dict(method="mirror", draft="streaming", draft_layers=2, streams=2, gamma=4, kappa=4, budget=4,
              branch_batch=4)
    spec = SpecConfig(draft_backend="onnx", onnx_max_len=128, **kw)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    res = generate(target, tok, prompt, params, spec)
    assert res.ids == generate(target, tok, prompt, params).ids
    assert res.metrics.extra["windows_by_source"]["passes"] > 0  # the streaming graph drafted
    folders = list((tmp_path / "cache").iterdir())
    assert len(folders) == 1 and read_metadata(str(folders[0]))["draft"]["streams"]["n_streams"] == 2
    stamp = (folders[0] / "draft.json").stat().st_mtime_ns
    res2 = generate(target, tok, prompt, params, spec)
    assert res2.ids == res.ids and (folders[0] / "draft.json").stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_token_channel_carries_a_spec_with_an_onnx_backend():
    """The distributed runtime sends the SpecConfig over gRPC; where the draft runs is the draft
    worker's deployment setting (draft.backend, onnx_dir, providers), not part of the message."""
    from mirror.runtime.channel import spec_from_proto, spec_to_proto

    spec = SpecConfig(method="mirror", draft="self", draft_layers=3, draft_backend="onnx", onnx_dir="/x",
                      onnx_providers=[QNN], onnx_strict=True)
    back = spec_from_proto(spec_to_proto(spec))
    assert (back.draft, back.draft_layers, back.draft_backend, back.onnx_dir) == ("self", 3, "torch", None)


# --- int8 drafts ---------------------------------------------------------------------------
def _assert_lossless(target, tok, spec, params):
    """Two prompts decode as plain decoding does, with the draft drafting."""
    for prompt in ([5, 6, 7, 8], list(b"hello world")):
        res = generate(target, tok, prompt, params, spec)
        assert res.ids == generate(target, tok, prompt, params).ids
        assert res.metrics.draft_tokens_computed > 0


def _int8_setup(tmp_path):
    """A tiny target, SmoothQuant statistics for it, and an int8 spec drafting with its own copy."""
    from helpers import byte_tokenizer, tiny_model
    from mirror.models.quant import calibrate_act_max, save_calibration

    target, tok = tiny_model("tiny", seed=3), byte_tokenizer()
    seqs = [list(torch.randint(1, 256, (40,), generator=torch.Generator().manual_seed(s)).tolist()) for s in range(4)]
    calib = str(tmp_path / "calib.safetensors")
    save_calibration(calib, calibrate_act_max(target, seqs, progress=False), {"alpha": 0.85})
    kw = dict(method="mirror", draft="model", draft_model="target", draft_quant="int8", int8_calib=calib,
              gamma=3, kappa=4, budget=4, branch_batch=4)
    return target, tok, calib, kw


def test_int8_draft_is_exported_as_dynamic_int8_graphs_on_first_use_and_lossless(tmp_path, monkeypatch):
    """draft_quant=int8 with the ONNX backend: the smoothed fp32 copy is exported and every
    weight MatMul quantized (DynamicQuantizeLinear + MatMulInteger); its logits stay near the
    fp32 model's (smoothing is exact, quantization small) and decoding stays lossless."""
    from dataclasses import replace

    from mirror.decoding.factory import build_draft_net
    from mirror.onnx.export import export_net

    monkeypatch.setenv("MIRROR_ONNX_CACHE", str(tmp_path / "cache"))
    target, tok, calib, kw = _int8_setup(tmp_path)
    spec = SpecConfig(draft_backend="onnx", onnx_max_len=128, **kw)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    _assert_lossless(target, tok, spec, params)
    (folder,) = (tmp_path / "cache").iterdir()
    meta = read_metadata(str(folder))
    assert meta["quant"]["mode"] == "int8" and meta["weights"]["per_graph"]
    assert meta["quant"]["int8_calib"]["file"] == calib and not (folder / "weights.bin").exists()
    n_linear = 3 * len(target.layers) + len(target.layers) + 1  # wqkv, wo, w13, w2 per layer + head
    for g in meta["graphs"].values():
        m = onnx.load(str(folder / g["file"]), load_external_data=False)
        inits = {i.name for i in m.graph.initializer}
        ops = [n.op_type for n in m.graph.node]
        assert ops.count("MatMulInteger") == n_linear and ops.count("DynamicQuantizeLinear") == n_linear
        assert not [n for n in m.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    nets = {"ort": build_draft_net(target, spec, "model"),
            "torch": build_draft_net(target, replace(spec, draft_backend="torch"), "model"),  # int8 on torch
            "smoothed": export_net(target, spec, "model"),  # the smoothed fp32 copy: the target's function
            "fp32": DraftNet.from_model(target)}
    toks = torch.randint(1, 256, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        out = {k: n(toks, torch.arange(24)[None], n.new_cache(1, 128), kv_len=24)[0] for k, n in nets.items()}
    ref = out["fp32"]
    err = {k: float((v - ref).abs().mean()) for k, v in out.items()}
    assert err["smoothed"] <= 1e-4 * float(ref.abs().mean())
    assert 0 < err["ort"] <= 2 * err["torch"]  # as close to the target as the PyTorch int8 draft


def test_an_int8_export_must_match_the_spec(tmp_path):
    from mirror.onnx.export import export_from_spec, export_net

    target, _, calib, kw = _int8_setup(tmp_path)
    spec = SpecConfig(**kw)
    d = str(tmp_path / "onnx")
    meta = export_from_spec(target, spec, d, rows=2, step_width=4, window_width=4, max_len=64)
    net = export_net(target, spec, "model")
    check_net(meta, net, "model", spec)
    from dataclasses import replace

    with pytest.raises(ValueError, match="quantization 'int8' != draft_quant 'none'"):
        check_net(meta, net, "model", replace(spec, draft_quant="none", int8_calib=None))
    other = str(tmp_path / "other.safetensors")
    shutil.copy(calib, other)
    with open(other, "ab") as f:
        f.write(b" ")  # another file: another hash
    with pytest.raises(ValueError, match="int8 calibration is not the one exported"):
        check_net(meta, net, "model", replace(spec, int8_calib=other))


def test_an_int8_draft_with_a_vocab_trim_exports_its_trimmed_head(tmp_path):
    """int8 + VocabTrim: the export quantizes the smoothed copy behind the trimmed head, records
    the trim, and ONNX Runtime picks the same tokens as the PyTorch int8 draft with that trim."""
    from dataclasses import replace

    from mirror.decoding.factory import build_draft_net
    from mirror.onnx.export import export_from_spec, export_net

    target, _, _, kw = _int8_setup(tmp_path)
    trim = str(tmp_path / "trim.json")
    keep = list(range(0, target.cfg.vocab_size, 3))
    VocabTrim(keep, target.cfg.vocab_size).save(trim)
    spec = SpecConfig(vocab_trim=trim, **kw)
    d = str(tmp_path / "onnx")
    meta = export_from_spec(target, spec, d, rows=2, step_width=4, window_width=4, max_len=64)
    assert meta["vocab_trim"]["size"] == len(keep) and meta["shapes"]["vocab"] == len(keep)
    check_net(meta, export_net(target, spec, "model"), "model", spec)
    with pytest.raises(ValueError, match="trimmed vocabulary, the spec none"):
        check_net(meta, export_net(target, replace(spec, vocab_trim=None), "model"), "model", spec)
    ort_net = OrtDraftNet(d, target_cfg=target.cfg)
    torch_net = build_draft_net(target, spec, "model")
    assert torch_net.head.out_features == ort_net.vocab == len(keep)
    toks = torch.randint(1, 256, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        a, b = (n(toks, torch.arange(20)[None], n.new_cache(1, 64), kv_len=20)[0] for n in (ort_net, torch_net))
    assert float((ort_net.to_full(a.argmax(-1)) == torch_net.to_full(b.argmax(-1))).float().mean()) >= 0.8
    assert set(ort_net.to_full(a.argmax(-1)).tolist()) <= set(keep)


def test_export_draft_cli_refuses_int8_for_a_draft_without_its_own_model(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli_main(["export-draft", "--draft", "self", "--draft-quant", "int8", "--out", str(tmp_path / "x")])
    assert e.value.code not in (0, None)
    assert "draft_quant applies to a 'model' draft" in capsys.readouterr().err


# --- the GGUF file's own blocks (draft_quant=gguf) -------------------------------------------
def _gguf_target(tmp_path, qtype: str):
    """A tiny llama target written as a quantized GGUF file and loaded back from it."""
    from helpers import tiny_model, write_gguf
    from mirror.models import load_model

    path = str(tmp_path / f"tiny-{qtype}.gguf")
    write_gguf(tiny_model("tiny", seed=5), path, qtype=qtype)
    return path, load_model(path, tokenizer=False).model


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_replace_the_files_weights_and_keep_the_rest(qtype, tmp_path):
    """convert_graph finds a weight in the file by value - here the fused, un-permuted q|k|v of
    layer 0, which the file holds as three permuted tensors - and runs it as MatMulNBits on the
    file's codes (Q4_1 with its offset term); a weight that is not the file's stays a MatMul.
    In fp32 arithmetic (accuracy level 0) the result is the fp32 product; with int8 activations
    (level 4, and always for 8-bit blocks) close to it."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from mirror.models.ort_target import join_global_pool
    from mirror.onnx.blocks import BlockTable, convert_graph

    path, target = _gguf_target(tmp_path, qtype)
    table = BlockTable(path)
    w_file = target.layers[0].wqkv.weight.detach().numpy()  # [N, K], rows from attn_q/k/v
    w_other = np.random.default_rng(0).standard_normal((96, 64)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((2, 3, 64)).astype(np.float32)
    for level, tol in ((0, 0.05 if qtype == "Q8_0" else 1e-5), (4, 0.05)):
        g = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w_file"], ["y_file"], name="file"),
             helper.make_node("MatMul", ["x", "w_other"], ["y_other"], name="other")], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 64])],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y_file", "y_other")],
            [numpy_helper.from_array(w_file.T.copy(), "w_file"), numpy_helper.from_array(w_other.T.copy(), "w_other")])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        assert convert_graph(model, table, accuracy_level=level) == {"converted": 1, "kept_fp32": 1}
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("MatMulNBits") == 1 and "w_file" not in {i.name for i in model.graph.initializer}
        assert ops.count("Add") == (1 if qtype == "Q4_1" else 0)  # Q4_1's offsets
        (nb,) = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        attrs = {a.name: helper.get_attribute_value(a) for a in nb.attribute}
        assert attrs["bits"] == (8 if qtype == "Q8_0" else 4)
        assert attrs["accuracy_level"] == (4 if qtype == "Q8_0" else level)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        join_global_pool(so)  # an onnx target made earlier in this process owns the thread pool
        y_file, y_other = ort.InferenceSession(model.SerializeToString(), so).run(None, {"x": x})
        ref = x @ w_file.T
        assert np.abs(y_file - ref).max() <= tol * np.abs(ref).max()
        np.testing.assert_allclose(y_other, x @ w_other.T, rtol=1e-5, atol=1e-5)


def test_gguf_q4_1_blocks_run_centred_so_int8_rounding_errors_cancel(tmp_path):
    """Q4_1's codes are all positive (w = d*q + m); convert_graph runs them centred on
    MatMulNBits' default zero point 8 with the offset term taking m + 8d. The weights are the
    same as in the zero-point-0 layout (`centre=False`): in fp32 arithmetic (level 0) both give
    the fp32 product. With int8 activations (level 4) the centred error is well below the other's."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from mirror.models.ort_target import join_global_pool
    from mirror.onnx.blocks import BlockTable, convert_graph

    path, target = _gguf_target(tmp_path, "Q4_1")
    table = BlockTable(path)
    w = target.layers[0].w13.weight.detach().numpy()  # [N, K]
    x = np.random.default_rng(2).standard_normal((1, 64, w.shape[1])).astype(np.float32)
    ref = x @ w.T
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    join_global_pool(so)
    err = {}
    for level in (0, 4):
        for centre in (True, False):
            g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="file")], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(w.T.copy(), "w")])
            m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
            assert convert_graph(m, table, accuracy_level=level, centre=centre)["converted"] == 1
            (mnb,) = [nd for nd in m.graph.node if nd.op_type == "MatMulNBits"]
            assert len(mnb.input) == (3 if centre else 4)  # centred: no zero_points input, the default 8
            y = ort.InferenceSession(m.SerializeToString(), so).run(None, {"x": x})[0]
            err[level, centre] = float(np.sqrt(((y - ref) ** 2).mean() / (ref ** 2).mean()))
    assert err[0, True] < 1e-6 and err[0, False] < 1e-6, err
    assert err[4, True] < 0.7 * err[4, False], err


def test_gguf_draft_export_is_lossless_and_converts_every_linear(tmp_path, monkeypatch):
    """draft_quant=gguf as a static-shape export (what an NPU provider gets, and any folder
    given as onnx_dir): the target's copy is exported with every linear layer and the tied head
    as MatMulNBits over the file's own Q4_1 blocks; the draft's logits are the target's up to
    int8 activations, and decoding stays lossless (sd and mirror)."""
    from dataclasses import replace

    from helpers import byte_tokenizer

    import mirror.onnx.export as export

    monkeypatch.setenv("MIRROR_ONNX_CACHE", str(tmp_path / "cache"))
    path, target = _gguf_target(tmp_path, "Q4_1")
    tok = byte_tokenizer()
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    spec = SpecConfig(method="sd", draft="model", draft_model="target", draft_quant="gguf",
                      draft_backend="onnx", onnx_max_len=128, gamma=3, kappa=4, budget=4, branch_batch=4)
    folder = export.cached_export(target, spec, "model")
    for method in ("sd", "mirror"):
        _assert_lossless(target, tok, replace(spec, method=method, onnx_dir=folder), params)
    meta = read_metadata(folder)
    assert meta["quant"]["mode"] == "gguf" and meta["quant"]["file"]["path"] == path
    n_linear = 4 * len(target.layers) + 1  # wqkv, wo, w13, w2 per layer + head
    for name, g in meta["graphs"].items():
        assert meta["quant"]["converted"][name] == {"converted": n_linear, "kept_fp32": 0}
        m = onnx.load(os.path.join(folder, g["file"]), load_external_data=False)
        ops = [n.op_type for n in m.graph.node]
        assert ops.count("MatMulNBits") == n_linear
    # the same export computing in fp32 (accuracy level 0): the draft is then the fp32 target
    # itself up to summation order - every weight was found and decoded right
    monkeypatch.setattr(export, "GGUF_ACCURACY_LEVEL", 0)
    monkeypatch.setenv("MIRROR_ONNX_CACHE", str(tmp_path / "cache0"))
    folder0 = export.cached_export(target, spec, "model")
    assert read_metadata(folder0)["quant"]["accuracy_level"] == 0
    nets = {"fp32 act": OrtDraftNet(folder0, target_cfg=target.cfg), "int8 act": OrtDraftNet(folder, target_cfg=target.cfg)}
    fp32 = DraftNet.from_model(target)
    toks = torch.randint(1, 256, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref = fp32(toks, torch.arange(24)[None], fp32.new_cache(1, 128), kv_len=24)[0]
        out = {k: n(toks, torch.arange(24)[None], n.new_cache(1, 128), kv_len=24)[0] for k, n in nets.items()}
    assert _maxdiff(out["fp32 act"], ref) <= 1e-4 * float(ref.abs().max())
    assert _maxdiff(out["int8 act"], ref) > 1e3 * _maxdiff(out["fp32 act"], ref)  # level 4 did quantize


def test_gguf_draft_on_the_cpu_is_a_built_graph_and_lossless(tmp_path, monkeypatch):
    """draft_quant=gguf on the CPU provider needs no export: the file's blocks go into one
    dynamic-shape graph (GgufDraftNet: MatMulNBits + GroupQueryAttention over the host cache),
    built on first use and kept; sd and mirror (branch rows through the same graph) stay
    lossless and the branches hit."""
    from helpers import byte_tokenizer

    from mirror.decoding.factory import build_draft_net
    from mirror.onnx.gguf_net import GgufDraftNet

    monkeypatch.setenv("MIRROR_ONNX_CACHE", str(tmp_path / "cache"))
    _, target = _gguf_target(tmp_path, "Q4_1")
    tok = byte_tokenizer()
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    hits = 0
    for method in ("sd", "mirror"):
        spec = SpecConfig(method=method, draft="model", draft_model="target", draft_quant="gguf",
                          draft_backend="onnx", gamma=3, kappa=4, budget=4, branch_batch=2, pre_budget=2)
        net = build_draft_net(target, spec, "model")
        assert isinstance(net, GgufDraftNet) and net is build_draft_net(target, spec, "model")
        assert net.counts == {"converted": 4 * len(target.layers) + 1, "kept_fp32": 0}
        for prompt in ([5, 6, 7, 8], list(b"hello world")):
            res = generate(target, tok, prompt, params, spec)
            assert res.ids == generate(target, tok, prompt, params).ids
            assert res.metrics.draft_tokens_computed > 0 and res.metrics.accepted_tokens > 0
            hits += res.metrics.hits
    assert hits > 0
    assert not (tmp_path / "cache").exists()  # nothing was exported


def test_gguf_graph_attends_like_the_target_in_steps_chunks_and_branch_rows(tmp_path):
    """At fp32 arithmetic (accuracy level 0) the built graph is the fp32 target up to
    summation order: a 20-token chunk, the same tokens one call each, a hypothesis row
    branching off the prefix (it must not see the prefix's later tokens, nor other rows),
    its second token, and the prefix after `install` took the row's entries."""
    from mirror.onnx.gguf_net import GgufDraftNet

    _, target = _gguf_target(tmp_path, "Q4_1")
    net = GgufDraftNet(target, accuracy_level=0)
    ref_net = DraftNet.from_model(target)
    toks = torch.randint(1, 256, (1, 20), generator=torch.Generator().manual_seed(7))

    def ref(seq):  # fp32 logits of every position of seq
        t = torch.tensor([seq])
        return ref_net(t, torch.arange(len(seq))[None], ref_net.new_cache(1, 64), kv_len=len(seq))[0]

    with torch.inference_mode():
        r = ref(toks[0].tolist())
        tol = 1e-4 * float(r.abs().max())
        cache = net.new_cache(1, 64)
        assert _maxdiff(net(toks, torch.arange(20)[None], cache)[0], r) <= tol
        cache2 = net.new_cache(1, 64)
        serial = torch.cat([net(toks[:, i:i + 1], torch.tensor([[i]]), cache2)[0] for i in range(20)])
        assert _maxdiff(serial, r) <= tol
        assert _maxdiff(net(toks, torch.arange(20)[None], net.new_cache(1, 64), last_only=True)[0, 0], r[-1]) <= tol
        # branch rows: the prefix holds 20 tokens; row 0 replaces token 12 with 99, row 1 token 17 with 42
        buf = net.new_branch_buffer(cache, max_rows=4, max_slots=4)
        cache.set_length(0, 20)
        prefix = torch.tensor([12, 17])
        lg = net.forward_branch(torch.tensor([[99], [42]]), prefix[:, None], cache, 0, prefix, buf, 17)
        seq0, seq1 = toks[0, :12].tolist() + [99], toks[0, :17].tolist() + [42]
        assert _maxdiff(lg[0], ref(seq0)[-1]) <= tol and _maxdiff(lg[1], ref(seq1)[-1]) <= tol
        lg2 = net.forward_branch(torch.tensor([[3], [4]]), prefix[:, None] + 1, cache, 0, prefix, buf, 17)
        assert _maxdiff(lg2[0], ref(seq0 + [3])[-1]) <= tol and _maxdiff(lg2[1], ref(seq1 + [4])[-1]) <= tol
        # the verdict takes row 1 (tokens 42, 4 after the first 17): its entries move to the prefix
        buf.install(1, cache, 0, 17, 2)
        cache.set_length(0, 19)
        nxt = net(torch.tensor([[9]]), torch.tensor([[19]]), cache)[0, 0]
        assert _maxdiff(nxt, ref(seq1 + [4, 9])[-1]) <= tol
        with pytest.raises(ValueError, match="before slots"):  # a row must feed its slots in order
            net.forward_branch(torch.tensor([[3]]), torch.tensor([[14]]), cache, 0, torch.tensor([12]), buf, 12, row0=2)


def test_lazy_catch_up_stops_where_the_draft_departs_from_the_window(tmp_path):
    """catch_up="lazy": before its pre-signal rollout the draft feeds another drafter's window
    in chunks and stops at the first position where its own top-1 is not the window's token;
    that position's own token is the rollout's hypothesis. The signal's hypotheses later feed
    the rest of the window - written past the committed prefix, never over the pre-signal row's
    scratch entries (GgufBranchBuffer.floor) - and a hit on either proposes what a fresh serial
    draft from that context does. A window the draft agrees with is fed whole."""
    from mirror.decoding.drafters.network import NetworkDrafter
    from mirror.decoding.messages import DraftWindow, EarlyExitSignal, Verdict
    from mirror.onnx.gguf_net import GgufDraftNet

    _, target = _gguf_target(tmp_path, "Q4_1")
    net = GgufDraftNet(target, accuracy_level=0)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    G = 4

    def drafter(catch_up="lazy"):
        return NetworkDrafter(net, params, 256, 96, max_rows=4, gamma_max=G, own_k=4, catch_up=catch_up)

    ctx = [10, 20, 30, 40, 50, 60, 7]
    n = len(ctx)
    with torch.inference_mode():
        serial = drafter("whole")
        serial.start(ctx)
        own = serial.propose(G).ids  # the draft's own greedy continuation
        x = next(t for t in range(100, 256) if t not in own)
        window = DraftWindow(own[:2] + [x, 9], None, "ngram")  # departs at position 2 (own[2] != x)
        for mode, fed in (("whole", n + G), ("lazy", n + 3)):
            d = drafter(mode)
            d.start(ctx)
            d.observe(window)
            assert d.prepare(G, 1) == 1
            assert d.kv == fed  # lazy: root, d_1 (views 0, 1), then d_2, x (views 2, 3): stop
            assert list(d._branches) == [(2, own[2])]  # its own token where it departs
        # the signal: the whole window accepted, then 77 - it needs d_3, d_4's K/V first
        r = next(t for t in range(1, 256) if t not in window.ids + [77])  # each position's runner-up
        top = torch.tensor([[t, r] for t in window.ids] + [[77, r]])
        sig = EarlyExitSignal(0, top, torch.log(torch.tensor([[0.99, 0.01]] * (G + 1))))
        d.expand(sig, G, 1)
        assert d.kv == n + G and set(d._branches) == {(2, own[2]), (G, 77)}
        for j, v in ((2, own[2]), (G, 77)):
            e = drafter()
            e.start(ctx)
            e.observe(window)
            e.prepare(G, 1)
            e.expand(sig, G, 1)
            hit = e.take(Verdict(0, j, v))
            fresh = drafter("whole")
            fresh.start(ctx + window.ids[:j] + [v])
            assert hit is not None and hit.ids == fresh.propose(G).ids
            nxt = Verdict(1, 1, 5)  # and the installed K/V serves the next window as a prefill would
            e.commit(nxt)
            fresh.commit(nxt)
            assert e.propose(G).ids == fresh.propose(G).ids
        agreed = drafter()  # a window the draft agrees with everywhere: fed whole, the full accept first
        agreed.start(ctx)
        agreed.observe(DraftWindow(list(own), None, "ngram"))
        agreed.prepare(G, 1)
        assert agreed.kv == n + G and list(agreed._branches)[0][0] == G
    with pytest.raises(ValueError, match="unknown catch_up"):
        SpecConfig(catch_up="sometimes")


def test_gguf_draft_prefills_long_prompts_with_the_exact_fp32_kv(tmp_path):
    """draft_prefill (default "auto"): a prompt of PREFILL_MIN tokens or more goes through the
    model's fp32 graph, so the draft's prompt K/V is the target's own (its 4-bit blocks are not);
    a shorter prompt, the window's tokens and draft_prefill=draft use the blocks; "fp32" takes
    every prompt. Decoding stays lossless, and fp32 is refused for a draft without those weights."""
    from dataclasses import replace

    from helpers import byte_tokenizer

    from mirror.decoding.drafters.network import PREFILL_MIN
    from mirror.decoding.factory import build_draft_net, build_drafter

    _, target = _gguf_target(tmp_path, "Q4_1")
    spec = SpecConfig(method="sd", draft="model", draft_model="target", draft_quant="gguf", gamma=3)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompt = torch.randint(1, 256, (PREFILL_MIN + 9,), generator=torch.Generator().manual_seed(3)).tolist()
    n = len(prompt)
    exact = target.new_cache(1, 128)
    with torch.inference_mode():
        target(torch.tensor([prompt]), torch.arange(n)[None], exact, kv_len=n)

    def prompt_kv_error(sp, p):
        d = build_drafter(target, sp, params, 128)
        d.warm(p)
        assert d.kv == len(p)
        return max(_maxdiff(d.cache.k[:, :, :, :len(p)], exact.k[:, :, :, :len(p)]),
                   _maxdiff(d.cache.v[:, :, :, :len(p)], exact.v[:, :, :, :len(p)])), d

    err_fp32, d = prompt_kv_error(spec, prompt)
    assert d.prefill == PREFILL_MIN and build_draft_net(target, spec, "model").status["prefill"]
    err_blocks, _ = prompt_kv_error(replace(spec, draft_prefill="draft"), prompt)
    assert err_fp32 < 1e-4 < 1e2 * err_fp32 < err_blocks
    short, _ = prompt_kv_error(spec, prompt[:PREFILL_MIN - 1])  # auto, below PREFILL_MIN: the blocks
    assert short > 1e2 * err_fp32
    forced, _ = prompt_kv_error(replace(spec, draft_prefill="fp32"), prompt[:PREFILL_MIN - 1])
    assert forced < 1e-4  # fp32: every prompt
    with torch.inference_mode():
        d.start(prompt + [7])  # warm's prompt KV is kept: the root and the window go through the blocks
        w = d.propose(3)
    assert len(w.ids) == 3 and d.kv == n + 3
    tok = byte_tokenizer()
    ar = generate(target, tok, prompt, params).ids
    for prefill in ("auto", "fp32", "draft"):
        for method in ("sd", "mirror"):
            sp = replace(spec, method=method, draft_prefill=prefill, kappa=4, budget=4, pre_budget=1)
            assert generate(target, tok, prompt, params, sp).ids == ar
    with pytest.raises(ValueError, match="unknown draft_prefill"):
        replace(spec, draft_prefill="int4")
    with pytest.raises(ValueError, match="draft_prefill=fp32 needs"):
        build_drafter(target, SpecConfig(method="sd", draft="self", draft_layers=1, draft_prefill="fp32"), params, 128)


def _prefilled_onnx_target(tmp_path, draft: str, n: int, seed: int):
    """A tiny Q4_1 GGUF target, its onnx backend with an n-token random prompt prefilled, and an
    sd spec whose `draft` network part is the target's own blocks."""
    from mirror.decoding.ar import prefill
    from mirror.models.ort_target import OrtTarget

    _, target = _gguf_target(tmp_path, "Q4_1")
    ort = OrtTarget(target)
    spec = SpecConfig(method="sd", draft=draft, draft_model="target", draft_quant="gguf", gamma=3)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompt = torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    cache = ort.new_cache(1, 128)
    prefill(ort, cache, prompt)
    return target, ort, spec, params, prompt, cache


def test_in_one_process_the_draft_adopts_the_targets_prompt_kv(tmp_path, monkeypatch):
    """In one process (in-process generate, a colocated deployment) the gguf draft would prefill a
    long prompt through the onnx target's own graph - what the target's prefill just did. It copies
    the target's prompt K/V instead (bit for bit), and decoding stays lossless. A draft whose fp32
    graph is its own (an eager target here; another process) and a short prompt under `auto`
    prefill as before."""
    from dataclasses import replace

    from helpers import byte_tokenizer

    from mirror.decoding.drafters.network import PREFILL_MIN
    from mirror.decoding.factory import build_drafter
    from mirror.onnx.gguf_net import GgufDraftNet

    target, ort, spec, params, prompt, cache = _prefilled_onnx_target(tmp_path, "model", PREFILL_MIN + 9, seed=4)
    n = len(prompt)
    d = build_drafter(ort, spec, params, 128)
    assert d.net.prefill_model is ort
    assert d.adopt_prompt(prompt, cache, ort) and d.kv == n
    assert torch.equal(d.cache.k[:, 0, :, :n], cache.k[:, 0, :, :n])
    assert torch.equal(d.cache.v[:, 0, :, :n], cache.v[:, 0, :, :n])
    with torch.inference_mode():
        d.start(prompt + [7])  # the adopted prompt is kept: only the root and the window are fed
        w = d.propose(3)
    assert len(w.ids) == 3 and d.kv == n + 3
    assert not build_drafter(ort, spec, params, 128).adopt_prompt(prompt[:PREFILL_MIN - 1], cache, ort)
    assert not build_drafter(ort, replace(spec, draft_prefill="draft"), params, 128).adopt_prompt(prompt, cache, ort)
    assert not build_drafter(target, spec, params, 128).adopt_prompt(prompt, cache, target)  # its own graph

    calls = []
    real = GgufDraftNet.prefill
    monkeypatch.setattr(GgufDraftNet, "prefill", lambda self, *a, **k: calls.append(len(a[0])) or real(self, *a, **k))
    tok = byte_tokenizer()
    ar = generate(ort, tok, prompt, params).ids
    for method in ("sd", "mirror"):
        sp = replace(spec, method=method, kappa=4, budget=4, pre_budget=1)
        assert generate(ort, tok, prompt, params, sp).ids == ar
    assert calls == []  # adopted both times: no second prefill
    assert generate(target, tok, prompt, params, spec).ids == generate(target, tok, prompt, params).ids
    assert calls == [n + 1]  # the eager target's draft prefills through its own fp32 graph (prompt + root)


def test_behind_the_channel_the_draft_takes_sent_prompt_kv_only_where_it_would_prefill_fp32(tmp_path):
    """Open.prompt_kv: the K/V the target sends (here its onnx graph's) are taken by a gguf
    draft that would prefill that prompt through the model's fp32 graph - the same K/V - and
    it then drafts what it drafts after its own prefill. Too short a prompt under `auto`,
    draft_prefill=draft, or K/V of another shape are refused, leaving the draft untouched;
    prompt_kv_min says which specs ask for them."""
    from dataclasses import replace

    from mirror.decoding.drafters.network import PREFILL_MIN
    from mirror.decoding.factory import build_drafter, prompt_kv_min

    target, _, spec, params, prompt, cache = _prefilled_onnx_target(tmp_path, "ngram+model", PREFILL_MIN + 5, seed=5)
    n = len(prompt)
    k, v = cache.k[:, 0, :, :n].clone(), cache.v[:, 0, :, :n].clone()
    own = build_drafter(target, spec, params, 128)  # another process's draft: its own fp32 graph
    sent = build_drafter(target, spec, params, 128)
    with torch.inference_mode():
        own.warm(prompt)
        assert sent.adopt_kv(prompt, k, v) and sent.net.kv == n
        assert torch.equal(sent.net.cache.k[:, 0, :, :n], k) and torch.equal(sent.net.cache.v[:, 0, :, :n], v)
        for d in (own, sent):
            d.start(prompt + [7])
        assert sent.propose(3).ids == own.propose(3).ids
        assert torch.equal(sent.net.cache.k[:, 0, :, :n], own.net.cache.k[:, 0, :, :n])
        fresh = build_drafter(target, spec, params, 128)
        assert not fresh.adopt_kv(prompt[:PREFILL_MIN - 1], k[:, :, :PREFILL_MIN - 1], v[:, :, :PREFILL_MIN - 1])
        assert not fresh.adopt_kv(prompt, k[:, :1], v[:, :1])  # one kv head of several
        assert fresh.net.kv == 0
        assert not build_drafter(target, replace(spec, draft_prefill="draft"), params, 128).adopt_kv(prompt, k, v)
    assert prompt_kv_min(spec) == PREFILL_MIN and prompt_kv_min(replace(spec, draft_prefill="fp32")) == 1
    assert prompt_kv_min(replace(spec, draft_prefill="draft")) is None
    assert prompt_kv_min(replace(spec, draft="ngram", draft_model=None, draft_quant="none")) is None
    assert prompt_kv_min(replace(spec, draft_quant="int8")) is None


def test_gguf_draft_runs_under_onnx_runtime_whatever_the_backend_and_needs_gguf_blocks(tmp_path, monkeypatch):
    """The file's blocks have no PyTorch kernel: draft_backend=torch still gets the built graph.
    A model not loaded from a GGUF file, or a GGUF file without quantized blocks, is refused -
    except in a combined n-gram + gguf draft (the embedded default), which then runs its n-gram
    part alone, losslessly."""
    from dataclasses import replace

    from helpers import byte_tokenizer, tiny_model, write_gguf

    from mirror.decoding.drafters.ngram import NgramDrafter
    from mirror.decoding.factory import build_draft_net, build_drafter
    from mirror.models import load_model
    from mirror.onnx.gguf_net import GgufDraftNet

    monkeypatch.setenv("MIRROR_ONNX_CACHE", str(tmp_path / "cache"))
    _, target = _gguf_target(tmp_path, "Q4_1")
    spec = SpecConfig(method="sd", draft="model", draft_model="target", draft_quant="gguf")
    assert spec.draft_backend == "torch" and isinstance(build_draft_net(target, spec, "model"), GgufDraftNet)
    with pytest.raises(ValueError, match="not loaded from a GGUF file"):
        build_draft_net(tiny_model("tiny"), replace(spec, draft_backend="onnx"), "model")
    f32 = str(tmp_path / "tiny-f32.gguf")
    write_gguf(tiny_model("tiny", seed=5), f32, qtype="F32")
    plain = load_model(f32, tokenizer=False).model
    with pytest.raises(ValueError, match="holds none of this model's linear layers"):
        build_draft_net(plain, spec, "model")
    tok = byte_tokenizer()
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    combined = replace(spec, method="mirror", draft="ngram+model", combine_min=1.2, kappa=4, budget=4)
    for model in (tiny_model("tiny", seed=5), plain):
        assert isinstance(build_drafter(model, combined, params, 64), NgramDrafter)
        res = generate(model, tok, [5, 6, 7, 8, 5, 6, 7], params, combined)
        assert res.ids == generate(model, tok, [5, 6, 7, 8, 5, 6, 7], params).ids


def test_every_linear_of_the_bundled_model_is_found_in_its_gguf_blocks(bundled):
    """The real file: its 210 Q4_1 tensors and the Q8_0 embedding decode to exactly the weights
    the loader gives the model (BlockTable checks each), and every linear layer of the loaded
    model - q|k|v fused with llama.cpp's q/k permutation undone, gate|up fused - and the tied
    head are found block for block; a perturbed weight is not."""
    from mirror.onnx.blocks import BlockTable

    model = bundled.model
    table = BlockTable(model.source_file)
    assert {t.kind for t in table.tensors} == {"Q4_1", "Q8_0"} and len(table.tensors) == 7 * model.cfg.n_layers + 1
    for blk in model.layers:
        for lin in (blk.wqkv, blk.wo, blk.w13, blk.w2):
            w = lin.weight.detach().numpy()
            hit = table.lookup(w)
            assert hit is not None and hit.kind == "Q4_1" and hit.codes.shape == (w.shape[0], w.shape[1] // 32, 32)
            np.testing.assert_allclose(hit.dequantized(), w, rtol=1e-6, atol=1e-7)
    head = model.lm_head.weight.detach().numpy()
    assert table.lookup(head).kind == "Q8_0"
    w = model.layers[0].w2.weight.detach().numpy().copy()
    w[3, 5] = np.nextafter(w[3, 5], np.float32(np.inf))
    assert table.lookup(w) is None


def test_a_request_longer_than_the_export_says_which_setting_to_raise(ort_net):
    with pytest.raises(ValueError, match=f"needs {MAX_LEN + 1} cache positions.*draft.onnx_max_len"):
        ort_net.new_cache(1, MAX_LEN + 1)
    assert ort_net.new_cache(1, MAX_LEN).max_len == MAX_LEN


def test_draft_profile_benchmark(tmp_path):
    """benchmarks/draft_profile.py times the gguf draft's built graph per (cached positions,
    tokens per call) and splits a profiled run's kernel time by op type, the LM head apart;
    bad arguments and a file without 4-bit blocks get a CLI error."""
    import json
    import subprocess
    import sys

    path, _ = _gguf_target(tmp_path, "Q4_1")
    out = tmp_path / "dp.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "benchmarks.draft_profile", "--model", path]
    r = subprocess.run(cmd + ["--contexts", "0", "20", "--tokens", "1", "3", "--reps", "3", "--out", str(out)],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(x["context"], x["tokens"]) for x in rows] == [(0, 1), (0, 3), (20, 1), (20, 3)]
    for x in rows:
        assert len(x["times_ms"]) == 3 and x["median_ms"] > 0
        ops = x["ops_ms"]
        assert ops["MatMulNBits"] > 0 and ops["head"] > 0 and ops["GroupQueryAttention"] > 0, ops
    assert "| 20 | 3 |" in r.stdout
    bad = subprocess.run(cmd + ["--reps", "0"], cwd=root, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--reps and --tokens must be >= 1" in bad.stderr
    from helpers import tiny_model, write_gguf

    f32 = str(tmp_path / "f32.gguf")
    write_gguf(tiny_model("tiny", seed=5), f32)
    bad = subprocess.run([sys.executable, "-m", "benchmarks.draft_profile", "--model", f32, "--contexts", "20"], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "holds none of this model's linear layers" in bad.stderr
