"""The target's transformer as ONNX Runtime graphs (CPU, fp32): `OrtTarget`, a drop-in for
`Transformer` in plain decoding, vanilla SD and Mirror-SD (`target_backend="onnx"`).

Why: ONNX Runtime's MLAS GEMMs with pre-packed weights run this model's linear layers ~1.8x
faster than the eager model's packed oneDNN path at 1 and at 6 rows on an AVX2 CPU, and one
session call per layer range replaces ~500 small eager ops per step
(`python -m benchmarks.linear_layouts`). Both plain decoding and speculation run on it, so
speedups stay side by side on the same target.

Exactness: speculation is lossless only if a token's logits are the same whether the target
sees it alone or inside a verification window. The graphs keep the eager model's recipe for
that: new keys/values are written into (a copy of) the cache at their positions *before*
attention, every query attends to the same cache layout over all S positions with masked
entries contributing exact zeros, and MLAS computes each row of a product independently of
the row count (checked bit for bit by `benchmarks.linear_layouts` and tests/test_ort_target.py).

Graphs are built directly with `onnx.helper` (no tracing): dynamic T (tokens per call) and S
(cache positions), weights as initializers. A model is cut into segments at the layer
boundaries the caller asks for (the Mirror-SD exit layer): segment graphs map hidden states to
hidden states and return the new K/V entries, which are written into the host `KVCache` here;
a head graph applies the final norm + LM head to the rows wanted. Embedding lookups and masks
stay in PyTorch (a few small ops per call).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time

import numpy as np
import torch

from .kv_cache import KVCache
from .llama import Transformer

log = logging.getLogger(__name__)

NEG = float(np.finfo(np.float32).min)


def available() -> bool:
    """Whether this environment can build the onnx target backend (onnx and onnxruntime installed)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


class _Builder:
    """Accumulates nodes and initializers with unique names.

    Large initializers (the weights) are not serialized into the protobuf: the graph names them
    as external data and `_session` hands ONNX Runtime the arrays themselves
    (`SessionOptions.add_external_initializers`). Building the bundled model's graphs that way
    takes ~1/3 of the time of serializing 540 MB of weights through protobuf and parsing them
    back."""

    EXTERNAL_MIN = 1024  # elements; ONNX Runtime wants >= 128 bytes for external tensors

    def __init__(self):
        from onnx import helper

        self.h = helper
        self.nodes, self.inits, self.n = [], [], 0
        self.external: dict[str, np.ndarray] = {}

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def op(self, kind: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(kind.lower()) for _ in range(n_out)]
        self.nodes.append(self.h.make_node(kind, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, base: str = "c") -> str:
        from onnx import numpy_helper

        name = self.name(base)
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        if arr.size >= self.EXTERNAL_MIN:
            from onnx import TensorProto

            t = TensorProto(name=name, dims=list(arr.shape),
                            data_type=self.h.np_dtype_to_tensor_dtype(arr.dtype),
                            data_location=TensorProto.EXTERNAL)
            for k, v in (("location", "mirror-in-memory"), ("offset", "0"), ("length", str(arr.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            self.external[name] = np.ascontiguousarray(arr)
            self.inits.append(t)
        else:
            self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def weight(self, w: torch.Tensor, base: str, transpose: bool = False) -> str:
        t = w.detach().float().cpu()
        return self.const(np.ascontiguousarray((t.t() if transpose else t).numpy()), base)

    def linear(self, x: str, lin) -> str:
        y = self.op("MatMul", [x, self.weight(lin.weight, "w", transpose=True)])
        if getattr(lin, "bias", None) is not None:
            y = self.op("Add", [y, self.weight(lin.bias, "b")])
        return y

    def rms_norm(self, x: str, norm) -> str:
        return self.op("SimplifiedLayerNormalization", [x, self.weight(norm.weight, "norm")], axis=-1,
                       epsilon=float(norm.eps))

    def model(self, inputs, outputs):
        from onnx import helper

        g = helper.make_graph(self.nodes, "mirror-target", inputs, outputs, self.inits)
        proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)],
                                  producer_name="mirror-sd")
        return Graph(proto, self.external)


@dataclasses.dataclass
class Graph:
    """An ONNX model without its large initializers, and those as arrays (see `_Builder`)."""

    proto: object
    external: dict


ATTENTION = ("materialized", "fused")


def segment_graph(model: Transformer, start: int, end: int, attention: str = "materialized"):
    """ONNX model for layers [start, end): inputs h [1, T, dim], position_ids [1, T] int64,
    then per `attention`:
    - "materialized" (any positions, exact row for row): mask [n_rep*T, S] (0 / NEG; query rows
      grouped as r*T + t), pos_idx [1, Hk, T, hd] int64 (the tokens' cache positions,
      broadcast), k_cache_i, v_cache_i [1, Hk, S, hd] per layer (the cache row or its first S
      positions: the call's own are written into a copy, then the scores over all S are
      materialized, masked and softmaxed);
    - "fused" (a span of new positions after a causal prefix, e.g. a prompt chunk):
      seqlens_k [1] int32 (= total_len - 1), total_len [] int32 (the span ends there),
      k_cache_i, v_cache_i [1, Hk, P, hd] (the P = total_len - T positions before the span),
      attended by com.microsoft GroupQueryAttention (causal; no mask or score tensor in the
      graph: 9-19% less time for 750- and 1,500-token prefills of the bundled model on 2
      threads; the same up to float rounding, not bit for bit);
    outputs h_out [1, T, dim], k_new, v_new [end - start, Hk, T, hd].

    Fused ONNX Runtime kernels keep the node count (each node costs a few microseconds per
    call) near 30 per layer: SimplifiedLayerNormalization for RMSNorm, com.microsoft
    RotaryEmbedding for RoPE (rotate-half layout)."""
    from onnx import TensorProto

    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    fused = attention == "fused"
    cfg = model.cfg
    H, Hk, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    b = _Builder()
    vi = b.h.make_tensor_value_info
    F32, I64, I32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    inputs = [vi("h", F32, [1, "T", cfg.dim]), vi("position_ids", I64, [1, "T"])]
    inputs += [vi("seqlens_k", I32, [1]), vi("total_len", I32, [])] if fused else \
        [vi("mask", F32, ["R", "S"]), vi("pos_idx", I64, [1, Hk, "T", hd])]
    half = hd // 2
    cos_cache = b.const(np.ascontiguousarray(model.rope_cos[:, :half].float().numpy()), "cos_cache")
    sin_cache = b.const(np.ascontiguousarray(model.rope_sin[:, :half].float().numpy()), "sin_cache")
    scale = None if fused else b.const(np.float32(1.0 / math.sqrt(hd)))
    shape = lambda *s: b.const(np.array(s, dtype=np.int64))  # noqa: E731

    def rope(x, heads):
        return b.op("RotaryEmbedding", [x, "position_ids", cos_cache, sin_cache], domain="com.microsoft",
                    interleaved=0, num_heads=heads)

    def head_norm(x, norm, heads):  # Qwen3: RMSNorm over head_dim
        y = b.rms_norm(b.op("Reshape", [x, shape(1, -1, heads, hd)]), norm)
        return b.op("Reshape", [y, shape(1, -1, heads * hd)])

    x = "h"
    ks, vs, kin, vin = [], [], [], []
    for i in range(start, end):
        blk = model.layers[i]
        past = "P" if fused else "S"
        kin.append(vi(f"k_cache_{i}", F32, [1, Hk, past, hd]))
        vin.append(vi(f"v_cache_{i}", F32, [1, Hk, past, hd]))
        qkv = b.linear(b.rms_norm(x, blk.attn_norm), blk.wqkv)  # [1, T, (H + 2 Hk) hd]
        q, k, v = b.op("Split", [qkv, b.const(np.array([H * hd, Hk * hd, Hk * hd], dtype=np.int64))],
                       n_out=3, axis=-1)
        if blk.q_norm is not None:
            q, k = head_norm(q, blk.q_norm, H), head_norm(k, blk.k_norm, Hk)
        q, k = rope(q, H), rope(k, Hk)
        kt = b.op("Transpose", [b.op("Reshape", [k, shape(1, -1, Hk, hd)])], perm=[0, 2, 1, 3])  # [1, Hk, T, hd]
        vt = b.op("Transpose", [b.op("Reshape", [v, shape(1, -1, Hk, hd)])], perm=[0, 2, 1, 3])
        ks.append(kt)
        vs.append(vt)
        if fused:  # (its present K/V outputs, past + span, are not used: the host writes k_new, v_new)
            o = b.name("attn")
            b.nodes.append(b.h.make_node(
                "GroupQueryAttention", [q, k, v, f"k_cache_{i}", f"v_cache_{i}", "seqlens_k", "total_len"],
                [o, b.name("present_k"), b.name("present_v")], domain="com.microsoft", num_heads=H, kv_num_heads=Hk))
            x = b.op("Add", [x, b.linear(o, blk.wo)])
        else:
            x = b.op("Add", [x, b.linear(_materialized(b, q, kt, vt, i, cfg, scale, shape), blk.wo)])
        g, u = b.op("Split", [b.linear(b.rms_norm(x, blk.ffn_norm), blk.w13),
                              b.const(np.array([cfg.ffn_dim, cfg.ffn_dim], dtype=np.int64))], n_out=2, axis=-1)
        act = b.op("Mul", [b.op("Mul", [g, b.op("Sigmoid", [g])]), u])
        x = b.op("Add", [x, b.linear(act, blk.w2)])
    b.nodes.append(b.h.make_node("Identity", [x], ["h_out"]))
    b.nodes.append(b.h.make_node("Concat", ks, ["k_new"], axis=0))
    b.nodes.append(b.h.make_node("Concat", vs, ["v_new"], axis=0))
    outputs = [vi("h_out", F32, [1, "T", cfg.dim]), vi("k_new", F32, [end - start, Hk, "T", hd]),
               vi("v_new", F32, [end - start, Hk, "T", hd])]
    return b.model(inputs + kin + vin, outputs)


def _materialized(b: _Builder, q: str, kt: str, vt: str, i: int, cfg, scale: str, shape) -> str:
    """Layer i's attention, materialized: the new K/V written into (a copy of) the cache input
    first, then scores over all its positions, masked, softmaxed (the eager model's order:
    exact) -> [1, T, H*hd]."""
    H, Hk, hd, n_rep = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_rep
    k_all = b.op("Reshape", [b.op("ScatterElements", [f"k_cache_{i}", "pos_idx", kt], axis=2), shape(Hk, -1, hd)])
    v_all = b.op("Reshape", [b.op("ScatterElements", [f"v_cache_{i}", "pos_idx", vt], axis=2), shape(Hk, -1, hd)])
    qg = b.op("Transpose", [b.op("Reshape", [q, shape(-1, Hk, n_rep, hd)])], perm=[1, 2, 0, 3])
    qg = b.op("Reshape", [qg, shape(Hk, -1, hd)])  # [Hk, n_rep*T, hd], row r*T + t
    s = b.op("MatMul", [qg, b.op("Transpose", [k_all], perm=[0, 2, 1])])  # [Hk, n_rep*T, S]
    p = b.op("Softmax", [b.op("Add", [b.op("Mul", [s, scale]), "mask"])], axis=-1)
    o = b.op("MatMul", [p, v_all])  # [Hk, n_rep*T, hd]
    o = b.op("Transpose", [b.op("Reshape", [o, shape(Hk, n_rep, -1, hd)])], perm=[2, 0, 1, 3])
    return b.op("Reshape", [o, shape(1, -1, H * hd)])


def head_graph(model: Transformer):
    """ONNX model: h [R, dim] -> logits [R, vocab] (final norm + LM head)."""
    from onnx import TensorProto

    b = _Builder()
    y = b.linear(b.rms_norm("h", model.norm), model.lm_head)
    b.nodes.append(b.h.make_node("Identity", [y], ["logits"]))
    vi = b.h.make_tensor_value_info
    return b.model([vi("h", TensorProto.FLOAT, ["R", model.cfg.dim])],
                   [vi("logits", TensorProto.FLOAT, ["R", model.cfg.vocab_size])])


INT8_BLOCK = 32  # MatMulNBits block along the input dimension


def int8_blocks(w: np.ndarray, block: int = INT8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] -> (codes uint8 [N, ceil(K / block), block], scales float32 [N, ceil(K / block)]):
    symmetric 8-bit blocks as MatMulNBits reads them, w ~ (code - 128) * scale (K zero-padded)."""
    N, K = w.shape
    kb = -(-K // block)
    wb = np.pad(w.astype(np.float32), ((0, 0), (0, kb * block - K))).reshape(N, kb, block)
    scale = np.abs(wb).max(-1) / 127.0
    scale[scale == 0] = 1.0
    codes = np.clip(np.rint(wb / scale[..., None]), -127, 127).astype(np.int16) + 128
    return codes.astype(np.uint8), scale.astype(np.float32)


def exit_graph(model: Transformer, keep_ids: torch.Tensor, kappa: int, down=None, up=None, quant: str = "none"):
    """ONNX model of a trimmed early-exit head: h [R, dim] -> ids [R, kappa] (target ids, int64)
    and logp [R, kappa]: the optional trained low-rank update h + (h down) up, the target's final
    norm, the LM head's `keep_ids` rows, log-softmax over them, top-kappa (ties: lower index).
    quant="int8": those rows as 8-bit blocks (`int8_blocks`) in a MatMulNBits node computing in
    int8 (accuracy_level 4) - a quarter of the bytes to read, which is what the head costs: right
    after the prefix layers its rows come from memory, not cache."""
    from onnx import TensorProto

    b = _Builder()
    h = "h"
    if down is not None:
        h = b.op("Add", [h, b.op("MatMul", [b.op("MatMul", [h, b.const(down.detach().float().numpy(), "down")]),
                                           b.const(up.detach().float().numpy(), "up")])])
    w = model.lm_head.weight.detach().float()[keep_ids]
    x = b.rms_norm(h, model.norm)
    if quant == "int8":
        codes, scales = int8_blocks(w.numpy())
        logits = b.name("matmulnbits")
        b.nodes.append(b.h.make_node("MatMulNBits", [x, b.const(codes, "wq"), b.const(scales, "ws")], [logits],
                                     domain="com.microsoft", K=w.shape[1], N=w.shape[0], bits=8,
                                     block_size=INT8_BLOCK, accuracy_level=4))
    elif quant == "none":
        logits = b.op("MatMul", [x, b.const(np.ascontiguousarray(w.t().numpy()), "w")])
    else:
        raise ValueError(f"unknown exit head quantization {quant!r}")
    logp = b.op("LogSoftmax", [logits], axis=-1)
    k = min(kappa, len(keep_ids))
    vals, idx = b.op("TopK", [logp, b.const(np.array([k], dtype=np.int64))], n_out=2, axis=-1, largest=1, sorted=1)
    ids = b.op("Gather", [b.const(keep_ids.to(torch.int64).numpy(), "keep"), idx], axis=0)
    b.nodes.append(b.h.make_node("Identity", [ids], ["ids"]))
    b.nodes.append(b.h.make_node("Identity", [vals], ["logp"]))
    vi = b.h.make_tensor_value_info
    return b.model([vi("h", TensorProto.FLOAT, ["R", model.cfg.dim])],
                   [vi("ids", TensorProto.INT64, ["R", k]), vi("logp", TensorProto.FLOAT, ["R", k])])


_GLOBAL_POOL: int | None = None  # threads of the process-wide ONNX Runtime pool, once made


def _global_pool(threads: int) -> bool:
    """Share one ONNX Runtime thread pool among the target's sessions. Their calls alternate
    (segment, segment, head), and separate pools either spin and steal each other's cores or
    sleep and pay a wake-up per parallel kernel (measured: 67 / 42 ms against 30 ms a step).
    The pool can only be made before ONNX Runtime's environment exists in this process."""
    global _GLOBAL_POOL
    if _GLOBAL_POOL is None:
        import onnxruntime.capi._pybind_state as C

        try:
            C.set_global_thread_pool_sizes(threads, 1)
            _GLOBAL_POOL = threads
        except Exception:  # the environment was already created (another session came first)
            _GLOBAL_POOL = 0
    return _GLOBAL_POOL == threads


def join_global_pool(so) -> bool:
    """Once this process has the shared ONNX Runtime pool, every later session must use it
    (ONNX Runtime refuses per-session threads then): any code creating sessions calls this on
    its options. Returns whether the session shares the pool (its own thread counts are then
    ignored)."""
    if _GLOBAL_POOL:
        so.use_per_session_threads = False
        return True
    return False


def _session(graph: Graph, threads: int, own: bool = False, affinity: str | None = None):
    """`own`: the session's own pool of `threads` (not the shared one; sleeping between calls),
    its extra threads pinned by `affinity` (ONNX Runtime's "session.intra_op_thread_affinities":
    1-based processor ids, one entry per pool thread; the caller's thread is the first)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if graph.external:  # ONNX Runtime copies them into the session (then pre-packs the MatMul weights)
        names = list(graph.external)
        so.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(graph.external[n]) for n in names])
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not own and (_global_pool(threads) or join_global_pool(so)):  # (a pool of another size, made first: joined)
        so.use_per_session_threads = False
    else:  # own pools that sleep between calls: slower, but they do not fight each other
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if affinity:
            so.add_session_config_entry("session.intra_op_thread_affinities", affinity)
    so.log_severity_level = 3
    return ort.InferenceSession(graph.proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def host_threads(n: int = 1):
    """PyTorch on `n` threads for the small host-side ops between ONNX Runtime calls (embedding,
    masks, early-exit head, acceptance). PyTorch's pool and ONNX Runtime's, each spinning after
    its work, otherwise fight over the cores: measured on 2 cores, a Mirror-SD step on this
    backend took 64 ms with PyTorch on 2 threads and 41.5 ms on 1 (its exit head 14 -> 3 ms)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class OrtTarget:
    """A `Transformer` whose layers and head run as ONNX Runtime sessions (one cache row).

    Supports the calls the target pipeline, plain decoding and prefill make: `__call__`/
    `forward`, `forward_layers` over unions of segments, `head`, `embed`, `new_cache`, and the
    eager model's `cfg`, `norm`, `lm_head` (trimmed early-exit heads stay in PyTorch). Layer
    ranges must start and end at segment boundaries: [0, N) plus any `splits` given (or added
    later with `split_at`, which rebuilds the two graphs around the new boundary)."""

    backend = "onnx"
    EXIT_HEADS_KEPT = 4  # trimmed early-exit head sessions kept (~20 MB each for an 8K trim)

    PREFILL_ROWS = 64  # calls of at least this many tokens run on the prefill sessions, if any

    def __init__(self, model: Transformer, splits=(), threads: int | None = None,
                 prefill_cores: list[int] | None = None, prefill_attention: str = "fused"):
        """`prefill_cores`: cores the prompt's prefill may use when they are more than `threads`
        (a worker decoding on one core of a CPU whose other core is idle while it prefills, the
        draft waiting for the prompt's K/V): prompt chunks (spans of PREFILL_ROWS tokens or more
        after the cached prefix) then run on a second set of sessions (+470 MB for the bundled
        model, 795 -> 1,262 MB) with one thread per core - this thread, plus one pinned to each
        core of `prefill_cores` it is not on. Needs this process to have no shared ONNX Runtime
        pool (the target's sessions then own one-thread pools); otherwise ignored, with a warning.
        `prefill_attention`: those sessions' attention (`segment_graph`): "fused" (a fused kernel,
        9-19% less prefill time; every request's prompt goes through it, so plain and
        speculative decoding still start from the same logits and K/V) or "materialized" (the
        decode sessions' graphs: bit for bit their results)."""
        if prefill_attention not in ATTENTION:
            raise ValueError(f"prefill_attention must be one of {', '.join(ATTENTION)}, got {prefill_attention!r}")
        self.prefill_attention = prefill_attention
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"the onnx target backend needs ONNX Runtime and onnx ({e}): "
                               "pip install 'mirror-sd[onnx]'") from e
        w = model.tok_emb.weight
        if w.dtype != torch.float32 or w.device.type != "cpu":
            raise ValueError("the onnx target backend runs fp32 models on the CPU")
        self.model = model
        self.cfg = model.cfg
        self.threads = threads or torch.get_num_threads()
        self.bounds: list[int] = []
        self.segments: dict[tuple[int, int], object] = {}
        self._exit_heads: dict[tuple, object] = {}  # (kappa, digest) -> run, least recently used first
        self.prefill_threads, self._prefill_affinity = self.threads, None
        self.prefill_segments: dict[tuple[int, int], object] = {}
        self._own = False
        others = sorted(set(prefill_cores or ()) - os.sched_getaffinity(0))
        if any(c >= (os.cpu_count() or 1) for c in others):
            log.warning("prefill_cores %s: this machine has cores 0-%d only", prefill_cores, (os.cpu_count() or 1) - 1)
            others = [c for c in others if c < (os.cpu_count() or 1)]
        if prefill_cores and others and self.threads == 1:
            if _GLOBAL_POOL:
                log.warning("prefill_cores %s ignored: this process already has a shared ONNX Runtime pool "
                            "(%d threads)", prefill_cores, _GLOBAL_POOL)
            else:
                self._own = True
                self.prefill_threads = 1 + len(others)
                self._prefill_affinity = ";".join(str(c + 1) for c in others)
        t0 = time.perf_counter()
        self.head_sess = self._session(head_graph(model))
        self._set_bounds(sorted({0, model.cfg.n_layers, *splits}))
        self.build_s = time.perf_counter() - t0
        self.pool = f"shared, {_GLOBAL_POOL} threads" if _GLOBAL_POOL and not self._own else \
            f"per session, {self.threads} threads, no spinning"
        if self.wide_prefill:
            self.pool += f"; prefill {self.prefill_threads} threads (cores {sorted(set(prefill_cores))})"

    @property
    def wide_prefill(self) -> bool:
        """Whether prompt-sized calls run on more threads than decoding (prefill_cores)."""
        return self.prefill_threads > self.threads

    def _session(self, graph: Graph, prefill: bool = False):
        if prefill:
            return _session(graph, self.prefill_threads, own=True, affinity=self._prefill_affinity)
        return _session(graph, self.threads, own=self._own)

    # --- graphs --------------------------------------------------------------------------------
    def _set_bounds(self, bounds: list[int]) -> None:
        for b in bounds:
            if not 0 <= b <= self.cfg.n_layers:
                raise ValueError(f"split {b} outside [0, {self.cfg.n_layers}]")
        segs, wide = {}, {}
        for a, b in zip(bounds, bounds[1:]):
            graph = None
            if (a, b) not in self.segments:
                graph = segment_graph(self.model, a, b)
            segs[(a, b)] = self.segments.get((a, b)) or self._session(graph)
            if self.wide_prefill:  # (a materialized prefill runs the decode sessions' graph)
                same = graph is not None and self.prefill_attention == "materialized"
                wide[(a, b)] = self.prefill_segments.get((a, b)) or self._session(
                    graph if same else segment_graph(self.model, a, b, self.prefill_attention), prefill=True)
        self.bounds, self.segments, self.prefill_segments = bounds, segs, wide

    def split_at(self, layer: int) -> None:
        if layer not in self.bounds:
            self._set_bounds(sorted({*self.bounds, layer}))

    def exit_head(self, keep_ids: torch.Tensor, kappa: int, trained=None, quant: str = "none"):
        """A trimmed early-exit head as an ONNX Runtime session on the target's pool: a callable
        h [R, dim] -> (ids [R, kappa], logp [R, kappa]), the same results as `EarlyExit`'s
        PyTorch path up to float rounding (the head is a guess for the draft; exactness does not
        depend on it). Built once per (kappa, trim set, trained head, quant) and kept: ~2.2 ms of
        PyTorch on one host thread per Mirror-SD step becomes 0.6-1.2 ms on the target's 2 or 1
        threads (`python -m benchmarks.exit_head_cost`); `quant="int8"`: see `exit_graph`."""
        import hashlib

        keep_ids = keep_ids.to(torch.int64)
        down, up = (trained.down, trained.up) if trained is not None else (None, None)
        digest = hashlib.sha1(keep_ids.numpy().tobytes())
        for t in (down, up):
            if t is not None:
                digest.update(t.detach().float().contiguous().numpy().tobytes())
        key = (kappa, digest.hexdigest(), quant)
        run = self._exit_heads.pop(key, None)
        if run is None:
            sess = self._session(exit_graph(self.model, keep_ids, kappa, down, up, quant))

            def run(h: torch.Tensor):
                ids, logp = sess.run(None, {"h": h.reshape(-1, h.shape[-1]).float().contiguous().numpy()})
                return torch.from_numpy(ids), torch.from_numpy(logp)

            while len(self._exit_heads) >= self.EXIT_HEADS_KEPT:  # least recently used goes
                self._exit_heads.pop(next(iter(self._exit_heads)))
        self._exit_heads[key] = run
        return run

    # --- the Transformer interface ---------------------------------------------------------------
    def __getattr__(self, name: str):
        # everything else (embed, new_cache, cfg, layers for a self-draft, norm and lm_head for a
        # trimmed early-exit head, dtype, device, ...) is the eager model's: drafts built from the target
        # run eagerly, which is fine - a draft's numerics need not match anything
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1]).float().contiguous()
        y = self.head_sess.run(None, {"h": x.numpy()})[0]
        return torch.from_numpy(y).reshape(*shape[:-1], y.shape[-1])

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, tokens, positions, cache: KVCache, start: int = 0, end: int | None = None, rows=None,
                kv_len: int | None = None, last_only: bool = False) -> torch.Tensor:
        h = self.forward_layers(self.embed(tokens), positions, cache, start, end, rows, kv_len)
        if last_only:
            h = h[:, -1:]
        return self.head(h)

    SLICE_ROWS = 32  # calls of at least this many tokens (prefill chunks) attend over a slice

    def _attended(self, max_len: int, needed: int, rows: int) -> int:
        """How many cache positions a call attends over: all `max_len`, or only the `needed`
        first (its last position + 1; later ones are masked for every row anyway). Both give
        bit-identical results - masked positions add exact zeros, and ONNX Runtime's softmax and
        MatMul results do not depend on how many of them trail (tests/test_ort_target.py checks
        it) - so this is a cost choice: the slice is a copy of `needed` positions, the whole row
        is fed as is but the graph copies it (ScatterElements) and attends over all of it. A
        prefill chunk (many rows) or a cache at most half used takes the slice."""
        if needed < max_len and (rows >= self.SLICE_ROWS or 2 * needed <= max_len):
            return needed
        return max_len

    def forward_layers(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int = 0,
                       end: int | None = None, rows=None, kv_len: int | None = None) -> torch.Tensor:
        """Layers [start, end) on h [1, T, dim] at positions [1, T]; writes their K/V into `cache`."""
        end = self.cfg.n_layers if end is None else end
        if start not in self.bounds or end not in self.bounds or start > end:
            raise ValueError(f"layer range [{start}, {end}) does not fall on this onnx target's segment "
                             f"boundaries {self.bounds} (split_at() adds one)")
        B, T, _ = h.shape
        row = 0 if rows is None else rows
        if isinstance(row, range) and len(row) == 1:
            row = row.start
        if not isinstance(row, int):
            raise ValueError("the onnx target backend runs one cache row per call")
        if B != 1 or positions.shape != (1, T):
            raise ValueError("the onnx target backend runs one sequence per call (batch 1)")
        cfg = self.cfg
        pos = positions[0]
        seen = int(pos.max()) + 1  # positions the call's last token sees
        kv_len = seen if kv_len is None else kv_len
        p0 = int(pos[0])
        span = bool((pos == torch.arange(p0, p0 + T)).all())
        wide = bool(self.prefill_segments) and T >= self.PREFILL_ROWS and span and kv_len == seen  # a prompt chunk
        sessions = self.prefill_segments if wide else self.segments
        if wide and self.prefill_attention == "fused":
            S = p0  # its past: the positions before the span
            common = {"position_ids": positions.contiguous().numpy(), "seqlens_k": np.array([seen - 1], np.int32),
                      "total_len": np.array(seen, np.int32)}
        else:
            S = self._attended(cache.max_len, seen, T)
            key = torch.arange(S)
            allowed = (key[None, :] <= pos[:, None]) & (key[None, :] < kv_len)  # [T, S]
            mask = torch.zeros(T, S).masked_fill_(~allowed, NEG).repeat(cfg.n_rep, 1)
            pos_idx = pos.view(1, 1, T, 1).expand(1, cfg.n_kv_heads, T, cfg.head_dim).contiguous()
            common = {"position_ids": positions.contiguous().numpy(), "mask": mask.numpy(),
                      "pos_idx": pos_idx.numpy()}
        x = h.float().contiguous()
        for a, b in zip(self.bounds, self.bounds[1:]):
            if a < start or b > end:
                continue
            feeds = {"h": x.numpy(), **common}
            for i in range(a, b):
                kc, vc = cache.layer(i)
                if S == cache.max_len:  # the cache row itself, no copy
                    feeds[f"k_cache_{i}"] = kc[row:row + 1].numpy()
                    feeds[f"v_cache_{i}"] = vc[row:row + 1].numpy()
                else:  # its first S positions (a copy: the slice is strided over heads)
                    feeds[f"k_cache_{i}"] = np.ascontiguousarray(kc[row:row + 1, :, :S].numpy())
                    feeds[f"v_cache_{i}"] = np.ascontiguousarray(vc[row:row + 1, :, :S].numpy())
            out, k_new, v_new = sessions[(a, b)].run(None, feeds)
            j0 = a - cache.layers.start
            kn, vn = torch.from_numpy(k_new), torch.from_numpy(v_new)  # [L, Hk, T, hd]
            if span:
                cache.k[j0:j0 + b - a, row, :, p0:p0 + T] = kn
                cache.v[j0:j0 + b - a, row, :, p0:p0 + T] = vn
            else:
                cache.k[j0:j0 + b - a, row, :, pos] = kn
                cache.v[j0:j0 + b - a, row, :, pos] = vn
            x = torch.from_numpy(out)
        return x
