"""Export a draft network to ONNX with static shapes (`mirror export-draft`).

One folder per export:

    draft.json        metadata: shapes, settings, versions, target fingerprint, graph signatures
    step_t1.onnx      serial step, 1 token  (drafting: one token per call)
    step_t64.onnx     serial step, T tokens (prefill / catch-up chunks; shorter inputs padded)
    branch_r8.onnx    Mirror-SD hypothesis rows: R rows x 1 token over the shared prefix
    stream_t3.onnx    speculative-streaming pass (only for a draft with streams)
    weights.bin       every weight once, shared by all graphs (ONNX external data)
    vocab_trim.json   the VocabTrim token set, when the head is trimmed

An int8 draft (draft_quant=int8: the SmoothQuant-smoothed copy of the target or of a draft
model) is exported from its smoothed fp32 weights, then each graph is quantized by ONNX
Runtime's dynamic quantizer: every MatMul with a constant weight becomes DynamicQuantizeLinear
(activations: uint8, one scale per call) + MatMulInteger (weights: uint8 with a scale and zero
point per output channel). Not int8 weights as in the PyTorch draft (models/quant.py): on CPUs
without VNNI, ONNX Runtime's u8 x s8 kernels saturate their 16-bit intermediate sums, and the
int8-weight graphs agreed with the target far less (tau 1.9 against 4.1 for uint8 weights on a
test prompt; 3.0 with 7-bit weights). The graphs are then
`<name>.int8.onnx`, each with its own `<name>.int8.onnx.data` (the quantizer writes one
external-data file per graph), and weights.bin is gone.

A gguf draft (draft_quant=gguf: the target's copy, or a GGUF draft model) is exported from the
fp32 weights its file's blocks decode to; each graph is then rewritten before its weights are
stored (blocks.py): every MatMul over a weight found in the file becomes MatMulNBits over the
file's own 4-/8-bit codes, and the graphs share one weights.bin as fp32 exports do.

Graph math and the KV contract (graphs read the static caches, return only new entries) are
in graphs.py; `OrtDraftNet` (runtime.py) drives the folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

import torch

from .blocks import LAYOUT as BLOCKS_LAYOUT
from .graphs import BranchGraph, StepGraph, StreamGraph

FORMAT = "mirror-onnx-draft"
VERSION = 3  # 2: a window-sized step graph beside the 1-token and chunk graphs; 3: caches squeezed, not gathered
READS = (1, 2, 3)  # version 1 exports run unchanged (their step widths are in the metadata)
META_FILE = "draft.json"
WEIGHTS_FILE = "weights.bin"
ALIGN = 65536  # external-data offsets on allocation-granularity boundaries, so ORT can mmap them
INLINE_BYTES = 4096  # smaller constants stay inside the graph files


def config_fingerprint(cfg) -> dict:
    """Identity of the target a draft was exported for: the short fingerprint the artifacts use
    plus a hash of the whole config."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("name", "extra")}
    return {"arch": cfg.arch, "dim": cfg.dim, "n_layers": cfg.n_layers, "vocab_size": cfg.vocab_size,
            "config_sha256": hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()}


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    import onnx

    v = {"torch": torch.__version__, "onnx": onnx.__version__}
    for mod in ("onnxscript", "onnxruntime"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            v[mod] = None
    from importlib.metadata import PackageNotFoundError, version

    try:
        v["mirror_sd"] = version("mirror-sd")
    except PackageNotFoundError:
        v["mirror_sd"] = None
    return v


class _WeightStore:
    """Writes each distinct large constant once into weights.bin; graphs reference it by offset."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")
        self.offsets: dict[str, tuple[int, int]] = {}  # sha256 -> (offset, length)

    def externalize(self, model) -> None:
        from onnx.external_data_helper import set_external_data

        for t in model.graph.initializer:
            data = t.raw_data
            if len(data) < INLINE_BYTES:
                continue
            key = hashlib.sha256(data).hexdigest()
            if key not in self.offsets:
                pos = self.f.tell()
                pad = (-pos) % ALIGN
                self.f.write(b"\0" * pad)
                self.offsets[key] = (pos + pad, len(data))
                self.f.write(data)
            off, n = self.offsets[key]
            set_external_data(t, self.path.name, offset=off, length=n)
            t.ClearField("raw_data")
            t.data_location = 1  # TensorProto.EXTERNAL

    def close(self) -> int:
        n = self.f.tell()
        self.f.close()
        return n


def _signature(model) -> dict:
    """{name: {"shape": [...], "dtype": "float32"}} of graph inputs and outputs."""
    import onnx

    def one(values):
        out = {}
        for v in values:
            tt = v.type.tensor_type
            out[v.name] = {"shape": [d.dim_value if d.HasField("dim_value") else d.dim_param
                                     for d in tt.shape.dim],
                           "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name}
        return out

    return {"inputs": one(model.graph.input), "outputs": one(model.graph.output)}


def _export_graph(module, args, input_names, output_names, opset: int | None):
    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed" notes, per export
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            prog = torch.onnx.export(module.eval(), args, input_names=input_names, output_names=output_names,
                                     dynamo=True, opset_version=opset, verbose=False, optimize=True)
    finally:
        quiet.setLevel(level)
    return prog.model_proto


def graph_plan(net, rows: int, step_widths: list[int], max_len: int, branch_slots: int) -> dict:
    """name -> (graph class, example args, input names, output names) for every graph to export."""
    L, Hk, hd = len(net.blocks), net.cfg.n_kv_heads, net.cfg.head_dim
    i64 = torch.long

    def buf(*shape):  # a fresh tensor per input: torch.export merges inputs given the same tensor
        return torch.zeros(*shape)

    def caches(rows=1, slots=max_len, names=("k_cache", "v_cache")):
        """One input per layer and K/V: [rows, Hk, slots, hd] slices of the host buffers."""
        return ([buf(rows, Hk, slots, hd) for _ in range(L) for _ in names],
                [f"{n}_{i}" for n in names for i in range(L)])

    kv, kv_names = caches()
    plan = {}
    for T in step_widths:
        plan[f"step_t{T}"] = (StepGraph, (torch.zeros(1, T, dtype=i64), torch.tensor([1]), torch.tensor([0]), *kv),
                              ["tokens", "pos0", "last", *kv_names], ["logits", "k_new", "v_new"])
    own, own_names = caches(rows, branch_slots, ("k_own", "v_own"))
    plan[f"branch_r{rows}"] = (BranchGraph, (torch.zeros(rows, 1, dtype=i64), torch.ones(rows, dtype=i64),
                                             torch.ones(rows, dtype=i64), *caches()[0], *own),
                               ["tokens", "positions", "prefix", *kv_names, *own_names], ["logits", "k_new", "v_new"])
    if net.streams is not None:
        T = 1 + net.streams.n_streams  # a pass feeds the last token + at most gamma_s guesses
        plan[f"stream_t{T}"] = (StreamGraph, (torch.zeros(1, T, dtype=i64), torch.tensor([1]), torch.tensor([1]),
                                              *caches()[0]),
                                ["tokens", "pos0", "n_valid", *kv_names],
                                ["logits", "stream_logits", "k_new", "v_new"])
    return plan


def export_draft(net, out_dir: str, *, target_cfg=None, kind: str = "self", rows: int = 8,
                 step_width: int = 64, window_width: int = 8, max_len: int = 2048, branch_slots: int = 18,
                 opset: int | None = None, source: dict | None = None, quant: dict | None = None) -> dict:
    """Export `net` (a DraftNet) into `out_dir`; returns the metadata written to draft.json.

    rows: hypothesis rows R of the branch graph; step_width: T of the chunk graph (prompt
    prefill); window_width: T of a graph sized for a draft window plus the tokens committed with
    it (what a draft feeds per step; capped at step_width); a 1-token graph is always exported
    too. max_len: cache positions S; branch_slots: W, own-token slots per hypothesis row
    (>= gamma). `source` records where the draft came from (layers, adapter, draft model, vocab
    trim file). `quant`: {"mode": "int8", ...} quantizes the exported graphs (see the module doc;
    the rest of the dict is recorded in draft.json)."""
    import onnx

    if quant is not None and quant.get("mode") not in ("int8", "gguf"):
        raise ValueError(f"unknown export quantization {quant.get('mode')!r}; int8 or gguf")
    blocks = None
    if quant is not None and quant["mode"] == "gguf":  # the file's own blocks: blocks.py
        from .blocks import BlockTable

        blocks = BlockTable(quant["file"]["path"])
        quant = {**quant, "converted": {}}

    for name, v, lo in (("rows", rows, 1), ("step_width", step_width, 1), ("window_width", window_width, 1),
                        ("max_len", max_len, 2), ("branch_slots", branch_slots, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if max_len > net.rope_cos.shape[0]:
        raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {net.rope_cos.shape[0]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    widths = sorted({1, min(window_width, step_width), step_width})
    t0 = time.perf_counter()
    store = _WeightStore(out / WEIGHTS_FILE)
    graphs, opsets = {}, set()
    try:
        for name, (cls, args, ins, outs) in graph_plan(net, rows, widths, max_len, branch_slots).items():
            with torch.no_grad():
                model = _export_graph(cls(net, max_len), args, ins, outs, opset)
            if blocks is not None:
                from .blocks import convert_graph

                quant["converted"][name] = convert_graph(model, blocks, quant.get("accuracy_level", 4))
            store.externalize(model)
            model.producer_name, model.doc_string = "mirror-sd", f"mirror draft graph {name}"
            onnx.save(model, str(out / f"{name}.onnx"))
            opsets.update(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
            graphs[name] = {"file": f"{name}.onnx", "kind": name.split("_")[0], **_signature(model)}
    finally:
        n_bytes = store.close()
    if quant is not None and quant["mode"] == "int8":  # weights.bin is replaced by per-graph int8 files
        weights = quantize_graphs(out, graphs)
    else:
        weights = {"file": WEIGHTS_FILE, "bytes": n_bytes, "sha256": _file_sha256(str(out / WEIGHTS_FILE))}
    keep = getattr(net, "keep_ids", None)
    vocab_trim = None
    if keep is not None:
        from ..decoding.drafters.vocab_trim import VocabTrim

        vt = VocabTrim(keep.tolist(), target_cfg.vocab_size if target_cfg is not None else int(keep.max()) + 1)
        vt.save(str(out / "vocab_trim.json"))
        vocab_trim = {"file": "vocab_trim.json", "size": len(vt),
                      "sha256": hashlib.sha256(json.dumps(vt.keep_ids.tolist()).encode()).hexdigest()}
    st = net.streams
    meta = {
        "format": FORMAT, "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "draft": {"kind": kind, "cache_layers": len(net.blocks), "layer_ids": [b.layer_id for b in net.blocks],
                  "streams": ({"n_streams": st.n_streams, "n_layers": st.n_layers, "rank": st.rank}
                              if st is not None else None),
                  **(source or {})},
        "shapes": {"rows": rows, "step_widths": widths, "max_len": max_len, "branch_slots": branch_slots,
                   "n_heads": net.cfg.n_heads, "n_kv_heads": net.cfg.n_kv_heads, "head_dim": net.cfg.head_dim,
                   "dim": net.cfg.dim, "vocab": net.head.out_features,
                   "target_vocab": target_cfg.vocab_size if target_cfg is not None else net.cfg.vocab_size},
        "kv": {"layout": "[n_layers, rows, n_kv_heads, max_len, head_dim]", "update": "new entries only",
               "note": "the host cache holds every layer in one buffer; graphs take layer i as inputs "
                       "k_cache_i/v_cache_i [rows, n_kv_heads, max_len, head_dim] (branch rows: "
                       "k_own_i/v_own_i [R, n_kv_heads, branch_slots, head_dim]), read them, and return "
                       "k_new/v_new; the runtime writes those at their positions (branch graph: at "
                       "slot = position - prefix of the row's buffer)"},
        "vocab_trim": vocab_trim,
        "dtype": "float32",
        "opset": max(opsets) if opsets else None,
        "versions": _versions(),
        "target": config_fingerprint(target_cfg if target_cfg is not None else net.cfg),
        "weights": weights,
        "quant": ({**quant, "scheme": QUANT_SCHEMES[quant["mode"]]} if quant is not None else None),
        "graphs": graphs,
        "export_s": round(time.perf_counter() - t0, 2),
    }
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / META_FILE)  # draft.json last: a folder with it is a finished export
    return meta


GGUF_ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations per block of 32 (blocks.py)
QUANT_SCHEMES = {
    "int8": ("onnxruntime dynamic quantization: MatMul -> DynamicQuantizeLinear (uint8 activations, "
             "per call) + MatMulInteger (uint8 weights, asymmetric, per output channel)"),
    "gguf": ("the GGUF file's own Q4_0/Q4_1/Q8_0 blocks: MatMul -> com.microsoft MatMulNBits (block 32; "
             "Q4_1's offsets as x @ block sums @ offsets), matched to the file by value (onnx/blocks.py)"),
}


def quantize_graphs(out: Path, graphs: dict) -> dict:
    """Quantize every exported graph in `out` (fp32, weights in weights.bin) to dynamic int8;
    updates `graphs` to the new files, removes the fp32 ones; returns draft.json's "weights"."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise ImportError(f"{e}: exporting an int8 draft needs onnxruntime (pip install 'mirror-sd[onnx]')") from e
    files, total = {}, 0
    for name, g in graphs.items():
        src, dst = out / g["file"], out / f"{name}.int8.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quiet = logging.getLogger()  # the quantizer logs "consider pre-processing" per graph
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QUInt8,
                                 op_types_to_quantize=["MatMul"], use_external_data_format=True,
                                 extra_options={"MatMulConstBOnly": True})
            finally:
                quiet.setLevel(level)
        src.unlink()
        data = dst.name + ".data"
        files[name] = data
        total += (out / data).stat().st_size
        g["file"] = dst.name
    (out / WEIGHTS_FILE).unlink()
    return {"files": files, "bytes": total, "per_graph": True}


def read_metadata(model_dir: str) -> dict:
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} holds no exported draft ({META_FILE} missing); "
                                f"make one with `mirror export-draft --out {model_dir}`")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a mirror ONNX draft export")
    if meta.get("version") not in READS:
        raise ValueError(f"{path} has export format version {meta.get('version')}, this runtime reads "
                         f"{', '.join(map(str, READS))}")
    return meta


def draft_source(spec, kind: str, layers: int | None) -> dict:
    """What the draft was built from, as recorded in draft.json."""
    src = {"layers": layers}
    if kind == "model":
        src["draft_model"] = "target" if spec.draft_model == "target" else os.path.abspath(spec.draft_model)
    if spec.adapter:
        src["adapter"] = {"file": os.path.abspath(spec.adapter), "sha256": _file_sha256(spec.adapter)}
    if spec.vocab_trim and spec.vocab_trim != "none":
        from ..models.bundled import resolve_artifact

        src["vocab_trim_file"] = os.path.abspath(resolve_artifact(spec.vocab_trim, "vocab_trim"))
    return src


def network_kind(spec) -> str:
    kind = next((k for k in spec.draft.split("+") if k != "ngram"), None)
    if kind is None:
        raise ValueError(f"draft {spec.draft!r} has no network to export (n-gram drafts need no ONNX)")
    return kind


def torch_draft_net(target, spec, kind: str):
    """The PyTorch DraftNet a SpecConfig describes, whatever its draft_backend (for
    draft_quant=gguf: the fp32 model its blocks decode to)."""
    import dataclasses

    from ..decoding.factory import build_draft_net

    if spec.draft_quant == "gguf" and kind == "model":
        return export_net(target, spec, kind)
    return build_draft_net(target, dataclasses.replace(spec, draft_backend="torch"), kind)


def export_net(target, spec, kind: str):
    """The PyTorch DraftNet to export for a SpecConfig: the draft itself, or for an int8 draft
    (draft_quant) its smoothed fp32 weights, which the export then quantizes."""
    if spec.draft_quant == "none" or kind != "model":
        return torch_draft_net(target, spec, kind)
    from ..decoding.drafters.network import DraftNet
    from ..decoding.factory import _separate_model, draft_keep_ids, smoothed_draft_model

    if spec.draft_quant == "gguf":  # the fp32 values the file's blocks decode to
        dm = target if spec.draft_model == "target" else _separate_model(spec.draft_model, target)
        return DraftNet.from_model(dm, draft_keep_ids(spec, kind))

    return DraftNet.from_model(smoothed_draft_model(spec.draft_model, target, spec.int8_calib),
                               draft_keep_ids(spec, kind))


def gguf_source(spec, target) -> str:
    """The GGUF file whose blocks a draft_quant=gguf draft runs: the target's for
    draft_model=target, else the draft model's."""
    path = getattr(target, "source_file", None) if spec.draft_model == "target" else spec.draft_model
    if not path or not os.path.isfile(path) or not str(path).endswith(".gguf"):
        what = "the target was not loaded from a GGUF file" if spec.draft_model == "target" \
            else f"{spec.draft_model} is not a GGUF file"
        raise ValueError(f"draft_quant=gguf needs a GGUF model with quantized blocks: {what}")
    return os.path.abspath(path)


def export_quant(spec, target=None) -> dict | None:
    """draft.json's "quant" entry for a SpecConfig's draft (None: not quantized)."""
    if spec.draft_quant == "none":
        return None
    if spec.draft_quant == "gguf":
        path = gguf_source(spec, target)
        return {"mode": "gguf", "file": {"path": path, "sha256": _file_sha256(path)},
                "accuracy_level": GGUF_ACCURACY_LEVEL, "layout": BLOCKS_LAYOUT}
    calib = None
    if spec.int8_calib:
        from ..models.bundled import resolve_artifact

        path = resolve_artifact(spec.int8_calib, "int8_calib")
        calib = {"file": os.path.abspath(path), "sha256": _file_sha256(path)}
    return {"mode": spec.draft_quant, "int8_calib": calib}


def export_from_spec(target, spec, out_dir: str, kind: str | None = None, net=None, **shapes) -> dict:
    """Build the draft a SpecConfig describes (self / model / streaming) and export it."""
    kind = kind or network_kind(spec)
    net = net or export_net(target, spec, kind)
    layers = None if kind == "model" else len(net.blocks) - (1 if _has_adapter(net, target) else 0)
    return export_draft(net, out_dir, target_cfg=target.cfg, kind=kind,
                        source=draft_source(spec, kind, layers), quant=export_quant(spec, target), **shapes)


def cache_root() -> Path:
    env = os.environ.get("MIRROR_ONNX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mirror-sd" / "onnx"


def _weights_sha256(net) -> str:
    h = hashlib.sha256()
    for name, p in sorted(net.state_dict().items()):
        h.update(name.encode())
        t = p.detach().contiguous().cpu()
        h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy())
    return h.hexdigest()


def cached_export(target, spec, kind: str | None = None, rows: int | None = None,
                  step_width: int = 64, max_len: int | None = None, window_width: int = 8) -> str:
    """The export folder for this spec's draft, exported on first use under cache_root().
    The key covers the target config, the draft's weights and settings and the exporter
    versions, so a changed draft never reuses a stale export."""
    kind = kind or network_kind(spec)
    rows, max_len = rows or spec.branch_batch, max_len or spec.onnx_max_len
    net = export_net(target, spec, kind)
    v = _versions()
    key = {"target": config_fingerprint(target.cfg), "weights": _weights_sha256(net), "kind": kind,
           "quant": [spec.draft_quant, [GGUF_ACCURACY_LEVEL, BLOCKS_LAYOUT] if spec.draft_quant == "gguf" else None],
           "ort": v.get("onnxruntime") if spec.draft_quant != "none" else None,
           "streams": [spec.streams, spec.stream_layers] if kind == "streaming" else None,
           "shapes": [rows, step_width, window_width, max_len], "format": VERSION,
           "versions": [v["torch"], v["onnx"], v["onnxscript"], v["mirror_sd"]]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    out = cache_root() / f"{kind}-{digest}"
    if (out / META_FILE).is_file():
        return str(out)
    import shutil
    import tempfile

    cache_root().mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{out.name}-", dir=cache_root())
    try:
        export_from_spec(target, spec, tmp, kind, net=net, rows=rows, step_width=step_width,
                         window_width=window_width, max_len=max_len)
        try:
            os.rename(tmp, out)  # atomic: a concurrent exporter of the same key loses the race harmlessly
        except OSError:
            if not (out / META_FILE).is_file():
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def check_net(meta: dict, net, kind: str, spec=None, target=None) -> None:
    """An export folder must hold the draft the spec asks for: compare it with the PyTorch
    DraftNet the spec builds (layers, adapter, vocabulary, streams) and list every difference."""
    d, diffs = meta["draft"], []
    if d["kind"] != kind:
        diffs.append(f"kind {d['kind']!r} != {kind!r}")
    if spec is not None:
        have = (meta.get("quant") or {}).get("mode", "none")
        if have != spec.draft_quant:
            diffs.append(f"quantization {have!r} != draft_quant {spec.draft_quant!r}")
        if have == spec.draft_quant == "gguf" and target is not None:
            if meta["quant"]["file"]["sha256"] != export_quant(spec, target)["file"]["sha256"]:
                diffs.append("the spec's GGUF file is not the one whose blocks were exported")
        elif have == spec.draft_quant != "none":
            got = ((meta.get("quant") or {}).get("int8_calib") or {}).get("sha256")
            want = ((export_quant(spec) or {}).get("int8_calib") or {}).get("sha256")
            if got != want:
                diffs.append("the spec's int8 calibration is not the one exported")
    ids = [b.layer_id for b in net.blocks]
    if d["layer_ids"] != ids:
        diffs.append(f"draft layers {d['layer_ids']} != {ids}")
    if spec is not None and spec.adapter and (d.get("adapter") or {}).get("sha256") != _file_sha256(spec.adapter):
        diffs.append(f"adapter {spec.adapter} is not the one exported")
    vt = meta.get("vocab_trim")
    keep = getattr(net, "keep_ids", None)
    if keep is None and vt:
        diffs.append("the export has a trimmed vocabulary, the spec none")
    elif keep is not None and (not vt or vt["sha256"] != hashlib.sha256(json.dumps(keep.tolist()).encode()).hexdigest()):
        diffs.append("the spec's vocab trim is not the one exported")
    st = d.get("streams")
    want = [net.streams.n_streams, net.streams.n_layers] if net.streams is not None else None
    have = [st["n_streams"], st["n_layers"]] if st else None
    if have != want:
        diffs.append(f"streams (n_streams, n_layers) {have} != {want}")
    if diffs:
        raise ValueError(f"the ONNX export does not match the speculative config: {'; '.join(diffs)}")


def _has_adapter(net, target) -> bool:
    return any(b.layer_id >= target.cfg.n_layers or b is not target.layers[b.layer_id] for b in net.blocks)
