"""A fast reader for GGUF files: the metadata and tensor index, with tensor data as plain
NumPy views of one memory map.

`gguf.GGUFReader` builds a NumPy memmap view per metadata item (the bundled model's tokenizer
alone has ~98k strings) and hands out memmap-subclass tensors whose every slice runs
`memmap.__array_finalize__`: loading SmolLM2-135M took 5.8 s in the reader and 2.7 s in
dequantization. This reader parses the header with `struct` over a `memoryview` and gives
plain `ndarray` views, which `gguf.quants.dequantize` handles with the same arithmetic (the
weights are bit-identical; tests/test_model.py checks it against `gguf.GGUFReader`).

The interface is the subset of `GGUFReader`'s this package uses: `fields[key].contents()`
(Python values; lists for arrays), `fields[key].data` (the same, for `len`), and `tensors`
with `name`, `tensor_type` (`gguf.GGMLQuantizationType`), `shape` (GGUF order: innermost
first) and `data` (float32/float16 elements, or uint8 rows of quantized blocks).
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
       7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


class GGUFFormatError(ValueError):
    pass


@dataclass(slots=True)
class Field:
    name: str
    value: object

    def contents(self):
        return self.value

    @property
    def data(self):
        return self.value


@dataclass(slots=True)
class Tensor:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: innermost dimension first
    data: np.ndarray


class GGUFFile:
    def __init__(self, path: str):
        import gguf

        with open(path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as e:  # an empty file
                raise GGUFFormatError(f"empty file ({e})") from e
        buf = memoryview(self._map)
        self._buf, self._pos = buf, 0
        if len(buf) < 24 or bytes(buf[:4]) != MAGIC:
            raise GGUFFormatError("no GGUF magic number at the start")
        self._pos = 4
        version = self._unpack("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = Field(key, self._value(self._unpack("<I")))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, self._pos)
            self._pos += 8 * n_dims
            ttype, offset = self._unpack("<I"), self._unpack("<Q")
            infos.append((name, dims, ttype, offset))
        align = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else 32
        start = -(-self._pos // align) * align
        self.tensors: list[Tensor] = []
        for name, dims, ttype, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(ttype)
            except ValueError as e:
                raise GGUFFormatError(f"tensor {name!r}: unknown tensor type {ttype}") from e
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims)) if dims else 1
            if dims and dims[0] % block:
                raise GGUFFormatError(f"tensor {name!r}: row of {dims[0]} is not a multiple of {block}")
            nbytes = n // block * type_size
            a = start + offset
            if a + nbytes > len(buf):
                raise GGUFFormatError(f"tensor {name!r} runs past the end of the file")
            raw = np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=a)
            if qtype.name == "F32":
                data = raw.view(np.float32)
            elif qtype.name == "F16":
                data = raw.view(np.float16)
            else:  # rows of quantized blocks, as gguf.quants.dequantize expects
                data = raw.reshape(n // dims[0] if dims[0] else 0, dims[0] // block * type_size)
            self.tensors.append(Tensor(name, qtype, tuple(int(d) for d in dims), data))
        self._buf = None  # the tensors keep the map alive through their views

    # --- parsing ----------------------------------------------------------------------------
    def _unpack(self, fmt: str):
        v = struct.unpack_from(fmt, self._buf, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return v

    def _string(self) -> str:
        n = self._unpack("<Q")
        s = bytes(self._buf[self._pos:self._pos + n])
        if len(s) != n:
            raise GGUFFormatError("a string runs past the end of the file")
        self._pos += n
        return s.decode("utf-8")

    def _value(self, vtype: int):
        if vtype == STRING:
            return self._string()
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])
        if vtype != ARRAY:
            raise GGUFFormatError(f"unknown metadata value type {vtype}")
        etype, count = self._unpack("<I"), self._unpack("<Q")
        if etype in _NP:
            dt = np.dtype(_NP[etype])
            arr = np.frombuffer(self._buf, dtype=dt, count=count, offset=self._pos)
            self._pos += dt.itemsize * count
            return arr.tolist()
        return [self._value(etype) for _ in range(count)]


__all__ = ["GGUFFile", "GGUFFormatError"]
