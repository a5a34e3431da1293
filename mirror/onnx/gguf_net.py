"""`GgufDraftNet`: a draft that runs the GGUF file's own blocks as one dynamic-shape ONNX
Runtime graph built by hand (`draft_quant=gguf` on the CPU provider).

The exported drafts (export.py, graphs.py) are static-shape graphs traced from PyTorch, as an
NPU compiler wants them: every call reads all `max_len` cache positions (47 MB of K and V per
drafted token at 1024 on the bundled model) and runs ~2,000 small nodes. A CPU needs neither,
so this net is built directly with `onnx.helper`, like the onnx target (models/ort_target.py):
per layer an RMSNorm, the file's 4-bit blocks as MatMulNBits (blocks.py), RoPE
(com.microsoft RotaryEmbedding) and com.microsoft GroupQueryAttention over a cache buffer it
shares with the host (the same memory bound as its past and present K/V: new entries are
written in place, and attention reads only the positions up to the call's last one). On the
bundled model it drafts a token in 10-14 ms at 128-900 cached positions (one thread), where
the static 1024-position export takes ~17 and the 2048 one ~23.

Mirror-SD's branch rows (`forward_branch`) go through the same graph: a call's hypothesis
rows are laid out as consecutive tokens in a scratch region of the buffer past the committed
prefix, at their logical positions for RoPE, and an additive attention bias lets each row see
only the prefix it branches from and its own earlier tokens. `GgufBranchBuffer` remembers
where each row's tokens went, and `install` copies a hit row's entries to the prefix.

The draft's numerics need not match anything (the target verifies every token); MatMulNBits
quantizes activations to int8 (accuracy level 4), so a token's logits differ slightly between
a 1-token call and a wider one.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import torch

from ..decoding.drafters.network import DraftNet
from ..models.kv_cache import KVCache
from ..models.ort_target import NEG


def build_graph(model, keep_ids: torch.Tensor | None = None, accuracy_level: int = 4, table=None,
                centre: bool = True):
    """The draft graph of `model` (a Transformer loaded from a GGUF file) with every linear
    layer that is one of the file's quantized tensors as MatMulNBits -> (ModelProto, counts).

    Inputs: tokens [1, T] int64, position_ids [1, T] int64 (RoPE positions), seqlens_k [1]
    int32 (= total_len - 1), total_len [] int32 (the call's tokens are written at positions
    total_len - T ..), bias [1, 1, T, total_len] float (0 / NEG), rows [N] int64 (the tokens
    whose logits are returned), k_i / v_i [1, Hk, S, hd] per layer (the host cache, also bound
    as the outputs pk_i / pv_i). Output logits [N, V'] (V' = len(keep_ids) when trimmed)."""
    from onnx import TensorProto, numpy_helper

    from ..models.ort_target import _Builder
    from .blocks import BlockTable, convert_graph

    cfg = model.cfg
    H, Hk, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    b = _Builder()
    vi = b.h.make_tensor_value_info
    F32, I64, I32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    inputs = [vi("tokens", I64, [1, "T"]), vi("position_ids", I64, [1, "T"]), vi("seqlens_k", I32, [1]),
              vi("total_len", I32, []), vi("bias", F32, [1, 1, "T", "S_total"]), vi("rows", I64, ["N"])]
    x = b.op("Gather", [b.weight(model.tok_emb.weight, "emb"), "tokens"], axis=0)  # [1, T, dim]
    half = hd // 2
    cos = b.const(np.ascontiguousarray(model.rope_cos[:, :half].float().numpy()), "cos")
    sin = b.const(np.ascontiguousarray(model.rope_sin[:, :half].float().numpy()), "sin")
    shape = lambda *s: b.const(np.array(s, dtype=np.int64))  # noqa: E731

    def head_norm(t, norm, heads):  # Qwen3: RMSNorm over head_dim
        y = b.rms_norm(b.op("Reshape", [t, shape(1, -1, heads, hd)]), norm)
        return b.op("Reshape", [y, shape(1, -1, heads * hd)])

    caches, presents = [], []
    for i, blk in enumerate(model.layers):
        caches += [vi(f"k_{i}", F32, [1, Hk, "S", hd]), vi(f"v_{i}", F32, [1, Hk, "S", hd])]
        qkv = b.linear(b.rms_norm(x, blk.attn_norm), blk.wqkv)
        q, k, v = b.op("Split", [qkv, b.const(np.array([H * hd, Hk * hd, Hk * hd], dtype=np.int64))],
                       n_out=3, axis=-1)
        if blk.q_norm is not None:
            q, k = head_norm(q, blk.q_norm, H), head_norm(k, blk.k_norm, Hk)
        q = b.op("RotaryEmbedding", [q, "position_ids", cos, sin], domain="com.microsoft", interleaved=0, num_heads=H)
        k = b.op("RotaryEmbedding", [k, "position_ids", cos, sin], domain="com.microsoft", interleaved=0, num_heads=Hk)
        o = b.name("attn")
        b.nodes.append(b.h.make_node("GroupQueryAttention", [q, k, v, f"k_{i}", f"v_{i}", "seqlens_k", "total_len",
                                                             "", "", "", "bias"], [o, f"pk_{i}", f"pv_{i}"],
                                     domain="com.microsoft", num_heads=H, kv_num_heads=Hk))
        presents += [vi(f"pk_{i}", F32, [1, Hk, "S", hd]), vi(f"pv_{i}", F32, [1, Hk, "S", hd])]
        x = b.op("Add", [x, b.linear(o, blk.wo)])
        g, u = b.op("Split", [b.linear(b.rms_norm(x, blk.ffn_norm), blk.w13),
                              b.const(np.array([cfg.ffn_dim, cfg.ffn_dim], dtype=np.int64))], n_out=2, axis=-1)
        x = b.op("Add", [x, b.linear(b.op("Mul", [b.op("Mul", [g, b.op("Sigmoid", [g])]), u]), blk.w2)])
    sel = b.op("Gather", [b.op("Reshape", [x, shape(-1, cfg.dim)]), "rows"], axis=0)  # [N, dim]
    head = model.lm_head if keep_ids is None else _Rows(model.lm_head.weight.detach()[keep_ids])
    b.nodes.append(b.h.make_node("Identity", [b.linear(b.rms_norm(sel, model.norm), head)], ["logits"]))
    V = cfg.vocab_size if keep_ids is None else len(keep_ids)
    graph = b.model(inputs + caches, [vi("logits", F32, ["N", V])] + presents)
    proto = graph.proto
    for j, init in enumerate(proto.graph.initializer):  # inline the weights: blocks.py reads them
        if init.name in graph.external:
            proto.graph.initializer[j].CopyFrom(numpy_helper.from_array(graph.external[init.name], init.name))
    table = table if table is not None else BlockTable(model.source_file)
    counts = convert_graph(proto, table, accuracy_level, centre)
    if not counts["converted"]:
        raise ValueError(f"{model.source_file} holds none of this model's linear layers as Q4_0/Q4_1/Q8_0 blocks")
    return proto, counts


# draft_prefill=fp32 feeds the prompt in chunks of this many tokens: a 1,654-token prompt takes
# 8.5 s in one call, 6.4 s in chunks of 512 and 6.1 s in chunks of 256 (the attention scores of
# a wide call outgrow the caches; one AVX2 thread, bundled model)
PREFILL_CHUNK = 256


class _Rows:  # a linear layer's weight rows (a VocabTrim head), for _Builder.linear
    def __init__(self, weight: torch.Tensor):
        self.weight, self.bias = weight, None


class GgufBranchBuffer:
    """Where Mirror-SD's hypothesis rows keep their own tokens: positions in the scratch region
    of the draft's cache (past the committed prefix), per row and slot. An expansion starts with
    row 0 at slot 0 and appends each call's rows after the previous call's."""

    def __init__(self, max_rows: int, max_slots: int):
        self.max_rows, self.max_slots = max_rows, max_slots
        self.base = 0  # first scratch position of the current expansion
        self.floor = 0  # ... at least this (NetworkDrafter: past the window under verification)
        self.used = 0  # scratch positions taken so far
        self.pos: dict[int, list[int]] = {}  # row -> cache position of each slot

    def install(self, row: int, cache: KVCache, main_row: int, start: int, n_slots: int) -> None:
        """Copy `row`'s first n_slots tokens' K/V to positions start.. of the prefix."""
        idx = torch.tensor(self.pos[row][:n_slots], dtype=torch.long)
        k, v = cache.k[:, main_row, :, idx].clone(), cache.v[:, main_row, :, idx].clone()  # read all, then write
        cache.k[:, main_row, :, start:start + n_slots] = k
        cache.v[:, main_row, :, start:start + n_slots] = v


class GgufDraftNet:
    """A DraftNet surface (what NetworkDrafter calls) over `build_graph`'s session: `forward`
    (serial steps and prefill chunks), `forward_branch` (Mirror-SD hypothesis rows),
    `new_cache`, `new_branch_buffer`, `to_full`, `full_probs`, `vocab`, `keep_ids`."""

    streams = None
    dtype = torch.float32
    batch_invariant = False

    def __init__(self, model, keep_ids: torch.Tensor | None = None, providers=None, *, strict: bool = False,
                 intra_threads: int = 1, inter_threads: int = 1, accuracy_level: int = 4, centre: bool = True):
        from .providers import create_session, parse_providers

        t0 = time.perf_counter()
        self.cfg = model.cfg
        self.L, self.n_kv, self.hd = model.cfg.n_layers, model.cfg.n_kv_heads, model.cfg.head_dim
        self.keep_ids = keep_ids
        self.max_positions = int(model.rope_cos.shape[0])  # RoPE table: logical positions < this
        proto, self.counts = build_graph(model, keep_ids, accuracy_level, centre=centre)
        self.sess, st = create_session(proto.SerializeToString(), parse_providers(providers), strict=strict,
                                       intra_threads=intra_threads, inter_threads=inter_threads)
        self.binding = self.sess.io_binding()
        self._bound: tuple | None = None  # the cache buffers bound as past/present K/V
        self._model, self._fp32 = model, None  # the prompt's full-precision graph (enable_prefill)
        self._lock = threading.Lock()
        self.build_s = time.perf_counter() - t0
        self.status = {**st, "graph": "gguf blocks, GroupQueryAttention (built, dynamic shapes)",
                       "converted": self.counts, "io_binding": True,
                       "threads": {"intra_op": intra_threads, "inter_op": inter_threads},
                       "build_s": round(self.build_s, 2)}

    @property
    def vocab(self) -> int:
        return self.cfg.vocab_size if self.keep_ids is None else len(self.keep_ids)

    to_full = DraftNet.to_full  # plain functions of keep_ids: shared, not copied
    full_probs = DraftNet.full_probs

    def new_cache(self, max_batch: int, max_len: int) -> KVCache:
        if max_batch != 1:
            raise ValueError(f"the gguf draft graph drives one cache row, not {max_batch}")
        if max_len > self.max_positions:
            raise ValueError(f"this draft needs {max_len} positions; the model's RoPE table holds {self.max_positions}")
        return KVCache(self.L, 1, self.n_kv, max_len, self.hd, layers=range(self.L))

    def new_branch_buffer(self, cache: KVCache, max_rows: int, max_slots: int) -> GgufBranchBuffer:
        """Branch rows write into a scratch region past the prefix: the cache grows by room for
        every row's slots (NetworkDrafter asks while it is new and empty; entries are kept)."""
        need = cache.max_len + max_rows * max_slots
        if cache.k.shape[3] < need:
            for name in ("k", "v"):
                old = getattr(cache, name)
                new = torch.zeros(*old.shape[:3], need, self.hd)
                new[:, :, :, :old.shape[3]] = old
                setattr(cache, name, new)
            cache.max_len = need
        return GgufBranchBuffer(max_rows, max_slots)

    def enable_prefill(self, fp32=None) -> None:
        """Build (or adopt) the graph `prefill` runs: the model's fp32 weights as the onnx
        target's graph (an `OrtTarget` over the same model; `fp32`: one already built, e.g.
        the in-process target's own). ~2 s and the fp32 weights' memory, once per net."""
        if self._fp32 is not None:
            return
        if fp32 is None:
            from ..models.ort_target import OrtTarget

            fp32 = OrtTarget(self._model, threads=self.status["threads"]["intra_op"])
        self._fp32 = fp32
        self.status["prefill"] = "fp32 graph (onnx target's)"

    @property
    def prefill_model(self):
        """The fp32 graph `prefill` runs (None until enable_prefill): the in-process onnx target
        itself when shared, so the target's prompt K/V is exactly what prefill would compute."""
        return self._fp32

    @property
    def can_prefill(self) -> bool:
        """Whether `prefill` can run: the model's weights are fp32 on the CPU."""
        w = self._model.tok_emb.weight
        return self._fp32 is not None or (w.dtype == torch.float32 and w.device.type == "cpu")

    def prefill(self, tokens: list[int], cache: KVCache) -> torch.Tensor:
        """The prompt tokens (positions 0..n-1) through the model's fp32 weights
        (draft_prefill): their exact K/V into cache row 0, and the last position's logits
        [1, V'] (the trimmed head's rows when trimmed). At prefill widths the fp32 GEMM is
        faster than the 4-bit blocks' int8 path on AVX2 (2.5-2.6 against 2.8-2.9 s for 800
        tokens, one thread), so the draft's prompt is ready when the target's is."""
        from ..decoding.ar import prefill

        self.enable_prefill()
        if len(tokens) > cache.k.shape[3]:
            raise ValueError(f"{len(tokens)} prompt tokens do not fit the draft cache ({cache.k.shape[3]} positions)")
        logits = prefill(self._fp32, cache, tokens, chunk=PREFILL_CHUNK).float()[None]
        return logits if self.keep_ids is None else logits[:, self.keep_ids]

    def __call__(self, tokens, positions, cache, rows=None, kv_len=None, last_only=False):
        return self.forward(tokens, positions, cache, rows, kv_len, last_only)

    def _run(self, cache: KVCache, tokens, position_ids, total: int, bias: np.ndarray, rows) -> torch.Tensor:
        if total > cache.k.shape[3]:
            raise ValueError(f"position {total - 1} is past the draft cache ({cache.k.shape[3]} positions)")
        feeds = {"tokens": np.ascontiguousarray(tokens, dtype=np.int64),
                 "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
                 "seqlens_k": np.array([total - 1], dtype=np.int32), "total_len": np.array(total, dtype=np.int32),
                 "bias": np.ascontiguousarray(bias, dtype=np.float32), "rows": np.asarray(rows, dtype=np.int64)}
        if int(feeds["position_ids"].max()) >= self.max_positions:
            raise ValueError(f"position {int(feeds['position_ids'].max())} is past the model's RoPE table")
        out = np.empty((len(feeds["rows"]), self.vocab), dtype=np.float32)
        with self._lock:
            bd = self.binding
            key = (cache.k.data_ptr(), cache.v.data_ptr(), tuple(cache.k.shape))
            if self._bound != key:
                for i in range(self.L):  # the cache as past and present K/V: written in place
                    for name, t in ((f"k_{i}", cache.k[i]), (f"v_{i}", cache.v[i])):
                        bd.bind_input(name, "cpu", 0, np.float32, tuple(t.shape), t.data_ptr())
                        bd.bind_output("p" + name, "cpu", 0, np.float32, tuple(t.shape), t.data_ptr())
                self._bound = key
            for name, a in feeds.items():
                bd.bind_input(name, "cpu", 0, a.dtype, a.shape, a.ctypes.data)
            bd.bind_output("logits", "cpu", 0, np.float32, out.shape, out.ctypes.data)
            self.sess.run_with_iobinding(bd)
        return torch.from_numpy(out)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows=None,
                kv_len: int | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens [1, n] at consecutive positions p0.. -> logits [1, 1, V'] (last_only) or
        [1, n, V']. Writes their K/V into cache row 0 at those positions; attends causally over
        positions < p0 + n (kv_len is implied)."""
        if tokens.shape[0] != 1 or (rows is not None and list(rows) != [0]):
            raise ValueError("GgufDraftNet runs cache row 0 only (one request per drafter)")
        n = tokens.shape[1]
        p0 = int(positions[0, 0])
        total = p0 + n
        bias = np.zeros((1, 1, n, total), dtype=np.float32)
        pos = np.arange(p0, total, dtype=np.int64)[None]
        out = self._run(cache, tokens.numpy(), pos, total, bias, [n - 1] if last_only else range(n))
        return out[None]

    def forward_branch(self, tokens, positions, cache, main_row, prefix, buf: GgufBranchBuffer, s_main,
                       row0: int = 0) -> torch.Tensor:
        """Hypothesis rows row0.. (tokens [n, 1] at positions [n, 1]; row r branches off the
        prefix's first prefix[r] positions) -> logits [n, V']. Their K/V go to the scratch region;
        each row attends to its prefix and its own earlier tokens (see the module docstring)."""
        if main_row != 0:
            raise ValueError("GgufDraftNet branches off cache row 0")
        if not isinstance(buf, GgufBranchBuffer):
            raise TypeError("branch buffers for GgufDraftNet come from its new_branch_buffer()")
        n = tokens.shape[0]
        pos = positions[:, -1].long()
        slots = (pos - prefix).tolist()
        if min(slots) < 0 or max(slots) >= buf.max_slots or row0 + n > buf.max_rows:
            raise ValueError(f"branch row/slot outside {buf.max_rows} rows x {buf.max_slots} slots")
        if row0 == 0 and max(slots) == 0:  # a new expansion: scratch starts past the prefix
            buf.base = max(cache.lengths[0], int(prefix.max()), buf.floor)
            buf.used, buf.pos = 0, {}
        start = buf.base + buf.used
        total = start + n
        bias = np.full((1, 1, n, total), NEG, dtype=np.float32)
        for r in range(n):
            row, s = row0 + r, slots[r]
            own = buf.pos.get(row, [])[:s] if s else []
            if len(own) != s:
                raise ValueError(f"branch row {row} feeds slot {s} before slots 0..{s - 1}")
            buf.pos[row] = own + [start + r]
            bias[0, 0, r, :int(prefix[r])] = 0.0
            bias[0, 0, r, buf.pos[row]] = 0.0
        out = self._run(cache, tokens[:, -1][None].numpy(), pos[None].numpy(), total, bias, range(n))
        buf.used += n
        return out
