"""The GGUF file's own quantized blocks in an exported draft graph (`draft_quant=gguf`).

A GGUF model's linear layers are stored as blocks of 32 weights with a scale (Q4_0: w = d*(q-8);
Q4_1: w = d*q + m; Q8_0: w = d*q); the loader dequantizes them to fp32, so the fp32 model - the
target - computes with exactly those values. A copy of the target exported as a draft holds the
same fp32 values in its graphs, four to eight times the bytes the file needed. This module puts
the blocks back: every MatMul (and the head's Gemm) whose constant weight is, output column for
output column, a row of a quantized tensor of the file becomes ONNX Runtime's MatMulNBits over
the very same codes and scales. Matching is by value (a digest of each dequantized row), so the
loader's transformations (llama.cpp's q/k permutation undone, q|k|v and gate|up fused, a
VocabTrim head's subset of rows) need no bookkeeping here, and a weight that is not the file's
stays fp32.

MatMulNBits computes (code - zero_point) * scale with an integer zero point; Q4_1's offset m is
not an integer multiple of d, so its blocks run with MatMulNBits' default zero point 8 (w = d *
(q - 8) + c with c = m + 8d) and the offset c is added as sum over blocks of c_b * sum(x_b):
x @ S @ C, where S [K, K/32] sums each block of the input and C [K/32, N] holds the offsets (two
small products: ~4% of the layer's multiply-adds). Centred codes matter at accuracy level 4:
there the input is rounded to int8 per block, and with Q4_1's all-positive codes (zero point 0)
those rounding errors add up instead of cancelling - on the bundled model the draft agreed with
the target on 94.8% of held-out tokens that way, 98.1% centred, at the same cost (AVX2 EPYC,
`python -m benchmarks.gguf_draft --uncentred`).

The weights are then the target's own, bit for bit; what differs from the fp32 target is the
arithmetic: with accuracy_level 4 (the default) MatMulNBits quantizes each 32-value block of the
input to int8 and runs integer dot products (VNNI where the CPU has it); with 0 it computes in
fp32 (slow beyond one row on CPU, and an 8-bit head always runs at level 4: ONNX Runtime's fp32
path dequantizes the whole 8-bit matrix per call). A draft's proposals never change what the
target commits, only how often it accepts them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

BLOCK = 32
LAYOUT = 2  # how blocks become MatMulNBits inputs (in export cache keys); 2: Q4_1 centred on 8
KINDS = ("Q4_0", "Q4_1", "Q8_0")
_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


@dataclass
class _Tensor:
    kind: str
    codes: np.ndarray  # uint8 [rows, nb, 32], unsigned codes as MatMulNBits reads them
    scale: np.ndarray  # float32 [rows, nb]
    offset: np.ndarray | None  # float32 [rows, nb] (Q4_1's m), else None

    @property
    def bits(self) -> int:
        return 8 if self.kind == "Q8_0" else 4

    @property
    def zero_point(self) -> int:
        return {"Q4_0": 8, "Q4_1": 0, "Q8_0": 128}[self.kind]

    def dequantized(self) -> np.ndarray:
        """[rows, cols] float32, as GGML decodes the blocks (Q4_1: d * q + m; else d * (q - zp))."""
        q = self.codes.astype(np.float32)
        if self.offset is not None:
            w = q * self.scale[..., None] + self.offset[..., None]
        else:
            w = (q - self.zero_point) * self.scale[..., None]
        return w.reshape(w.shape[0], -1)


def parse_blocks(kind: str, raw: np.ndarray, rows: int, cols: int) -> _Tensor:
    """A GGUF tensor's raw bytes ([rows, bytes per row]) as codes / scales / offsets."""
    if kind not in KINDS:
        raise ValueError(f"{kind} blocks are not supported (only {', '.join(KINDS)})")
    if cols % BLOCK:
        raise ValueError(f"row length {cols} is not a multiple of the block size {BLOCK}")
    nb = cols // BLOCK
    blk = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, nb, _BYTES[kind])
    f16 = lambda b: np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)  # noqa: E731
    scale = f16(blk[..., 0:2])
    offset = None
    if kind == "Q8_0":
        codes = (blk[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:
        start = 2
        if kind == "Q4_1":
            offset, start = f16(blk[..., 2:4]), 4
        qs = blk[..., start:]  # GGML: element j in the low nibble of byte j, element j+16 in the high one
        codes = np.concatenate([qs & 15, qs >> 4], axis=-1)
    return _Tensor(kind, np.ascontiguousarray(codes), scale, offset)


def _digest(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=16).digest()


class BlockTable:
    """Every row of the file's quantized tensors, by a digest of its fp32 (dequantized) values."""

    def __init__(self, gguf_path: str):
        from ..models.loader import _dequantize, _read_gguf

        reader = _read_gguf(gguf_path)
        self.path = gguf_path
        self.tensors: list[_Tensor] = []
        self.rows: dict[bytes, tuple[int, int]] = {}
        for t in reader.tensors:
            kind = t.tensor_type.name
            if kind not in KINDS or len(t.shape) != 2:
                continue
            cols, rows = (int(x) for x in t.shape)  # GGUF lists dims innermost-first
            blocks = parse_blocks(kind, np.asarray(t.data), rows, cols)
            deq = _dequantize(t).reshape(rows, cols)  # exactly what the loader gives the model
            if not np.allclose(blocks.dequantized(), deq, rtol=1e-6, atol=1e-7):
                raise ValueError(f"tensor {t.name}: its {kind} blocks do not decode to the loader's weights")
            ti = len(self.tensors)
            self.tensors.append(blocks)
            for r in range(rows):
                self.rows.setdefault(_digest(deq[r]), (ti, r))

    def lookup(self, w_rows: np.ndarray) -> _Tensor | None:
        """The blocks of a weight given as output rows [N, K], when every row is one of the
        file's rows of one kind; None otherwise."""
        hits = [self.rows.get(_digest(r)) for r in w_rows]
        if any(h is None for h in hits):
            return None
        kinds = {self.tensors[t].kind for t, _ in hits}
        if len(kinds) != 1:
            return None
        pick = lambda a: np.stack([a[t][r] for t, r in hits])  # noqa: E731
        ts = self.tensors
        return _Tensor(kinds.pop(), pick([x.codes for x in ts]), pick([x.scale for x in ts]),
                       pick([x.offset for x in ts]) if ts[hits[0][0]].offset is not None else None)


def convert_graph(model, table: BlockTable, accuracy_level: int = 4, centre: bool = True) -> dict:
    """Rewrite `model` (an onnx ModelProto with inline weights) in place: each constant-weight
    MatMul / Gemm(transB=1) found in `table` becomes MatMulNBits. Returns counts. `centre=False`:
    Q4_1 with zero point 0 and offsets m, the earlier layout (kept for benchmarks.gguf_draft)."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    used_before = {x for n in g.node for x in n.input}
    nodes, converted, kept, new_inits = [], 0, 0, []
    uid = [0]

    def const(arr: np.ndarray, base: str) -> str:
        uid[0] += 1
        name = f"gguf_{base}_{uid[0]}"
        new_inits.append(numpy_helper.from_array(arr, name))
        return name

    for node in g.node:
        w_rows = x = None
        if node.op_type == "MatMul" and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            if w.ndim == 2:
                w_rows, x = w.T, node.input[0]
        elif node.op_type == "Gemm" and len(node.input) == 2 and node.input[1] in inits:
            at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if at.get("transB", 0) == 1 and at.get("transA", 0) == 0 and at.get("alpha", 1.0) == 1.0:
                w_rows, x = numpy_helper.to_array(inits[node.input[1]]), node.input[0]
        hit = table.lookup(w_rows) if w_rows is not None else None
        if hit is None:
            kept += w_rows is not None
            nodes.append(node)
            continue
        converted += 1
        base = f"{node.name or node.op_type}_gguf{converted}"  # unique, also for unnamed nodes
        n_rows, k = w_rows.shape
        nb = k // BLOCK
        codes = hit.codes if hit.bits == 8 else (hit.codes[..., 0::2] | (hit.codes[..., 1::2] << 4))
        ins = [x, const(np.ascontiguousarray(codes, dtype=np.uint8), "codes"),
               const(np.ascontiguousarray(hit.scale.reshape(-1), dtype=np.float32), "scales")]
        # no zero_points input: MatMulNBits' default 2^(bits-1) is Q4_0's 8 and Q8_0's 128, and
        # Q4_1 runs centred on it too (its offset term below takes the difference)
        if hit.offset is not None and not centre:
            ins.append(const(np.zeros((n_rows * ((nb + 1) // 2),), dtype=np.uint8), "zero_points"))
        out = node.output[0]
        main = out if hit.offset is None else f"{out}_gguf_blocks"
        level = 4 if hit.bits == 8 else accuracy_level
        nodes.append(helper.make_node("MatMulNBits", ins, [main], name=base, domain="com.microsoft",
                                      K=k, N=n_rows, bits=hit.bits, block_size=BLOCK, accuracy_level=level))
        if hit.offset is not None:  # Q4_1: d*q + m = d*(q - 8) + c, c = m + 8d: + sum_b c_b * sum(x_b)
            sums = np.kron(np.eye(nb, dtype=np.float32), np.ones((BLOCK, 1), np.float32))  # [K, nb]
            s = f"{out}_gguf_block_sums"
            nodes.append(helper.make_node("MatMul", [x, const(sums, "block_sum")], [s], name=f"{base}_sums"))
            o = f"{out}_gguf_offsets"
            c = hit.offset + 8 * hit.scale if centre else hit.offset
            nodes.append(helper.make_node("MatMul", [s, const(np.ascontiguousarray(c.T), "offsets")], [o],
                                          name=f"{base}_offsets"))
            nodes.append(helper.make_node("Add", [main, o], [out], name=f"{base}_add"))
    del g.node[:]
    g.node.extend(nodes)
    still = {x for n in g.node for x in n.input}
    drop = [i for i in g.initializer if i.name not in still and i.name in used_before]
    for i in drop:
        g.initializer.remove(i)
    g.initializer.extend(new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"converted": converted, "kept_fp32": kept}
