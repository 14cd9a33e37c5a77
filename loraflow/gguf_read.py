"""A fast GGUF reader: the header (metadata, tensor infos) without parsing vocabularies, and
tensor data on demand through a memory map.

gguf.GGUFReader builds Python objects for every vocabulary entry (seconds for a 150k vocab);
what loraflow needs from a GGUF (the converter's base-model shapes, `loraflow-convert inspect`,
`export-lora`) is scalars, short arrays, tensor shapes and types, and the data of a few
tensors. Arrays longer than MAX_KEEP elements are skipped: their value reads as None and
their length is kept in `GGUFHeader.array_lengths`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from loraflow.errors import FormatError

MAX_KEEP = 1024  # longer arrays (vocabularies, merges) are skipped, shorter ones (per-layer values) kept
DEFAULT_ALIGNMENT = 32

_SCALAR = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]          # ggml order: shape[0] = ne[0], the row length
    type: GGMLQuantizationType
    offset: int                     # absolute byte offset of the data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


@dataclass
class GGUFHeader:
    path: Path
    version: int
    meta: dict                                  # key -> value (long arrays: None)
    types: dict[str, tuple]                     # key -> (value type,) or (ARRAY, element type)
    array_lengths: dict[str, int]               # key -> length, for every array
    tensors: dict[str, TensorInfo] = field(repr=False)  # in file order
    file_size: int = 0
    data_offset: int = 0

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: t.shape for name, t in self.tensors.items()}

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(f"{self.path}: no tensor {name}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored: numpy shape (*ggml shape[1:] reversed, bytes per row), uint8."""
        t = self.tensor(name)
        block, type_size = GGML_QUANT_SIZES[t.type]
        row_bytes = t.shape[0] // block * type_size if t.shape else type_size
        data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,))
        return data.reshape(*t.numpy_shape[:-1], row_bytes)

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32 in numpy order (dequantized where needed)."""
        from gguf.quants import dequantize

        t = self.tensor(name)
        raw = self.raw(name)
        try:
            if t.type == GGMLQuantizationType.F32:
                out = raw.view(np.float32)
            elif t.type == GGMLQuantizationType.F16:
                out = raw.view(np.float16)
            else:
                out = dequantize(raw, t.type)
        except NotImplementedError:
            raise FormatError(f"{self.path}: {name}: cannot dequantize type {t.type.name}") from None
        return np.array(out, dtype=np.float32).reshape(t.numpy_shape)


MAX_DIMS = 4  # GGML_MAX_DIMS


class _Cursor:
    def __init__(self, f, size: int):
        self.f = f
        self.size = size

    def left(self) -> int:
        return self.size - self.f.tell()

    def unpack(self, fmt):
        size = struct.calcsize("<" + fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise EOFError
        return struct.unpack("<" + fmt, data)

    def string(self) -> str:
        (n,) = self.unpack("Q")
        if n > self.left():  # a corrupt length: do not try to read (or allocate) it
            raise EOFError
        return self.f.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        """(value, array length or None, element type or None)"""
        vtype = GGUFValueType(vtype)
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])[0], None, None
        if vtype == GGUFValueType.STRING:
            return self.string(), None, None
        if vtype == GGUFValueType.ARRAY:
            etype, n = self.unpack("IQ")
            etype = GGUFValueType(etype)
            # every element takes at least a byte (a string, its 8-byte length)
            if n > self.left() // (8 if etype == GGUFValueType.STRING else struct.calcsize("<" + _SCALAR.get(etype, "B"))):
                raise EOFError
            if etype in _SCALAR and n > MAX_KEEP:  # skip without parsing
                self.f.seek(n * struct.calcsize("<" + _SCALAR[etype]), 1)
                return None, n, etype
            if etype == GGUFValueType.STRING and n > MAX_KEEP:
                for _ in range(n):
                    (m,) = self.unpack("Q")
                    self.f.seek(m, 1)
                return None, n, etype
            return [self.value(etype)[0] for _ in range(n)], n, etype
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_header(path) -> GGUFHeader:
    """Metadata and tensor infos of a GGUF file, checked to lie inside the file."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            c = _Cursor(f, size)
            if f.read(4) != b"GGUF":
                raise FormatError(f"{path}: not a GGUF file (bad magic)")
            (version,) = c.unpack("I")
            if version not in (2, 3):
                raise FormatError(f"{path}: GGUF version {version} is not supported")
            n_tensors, n_kv = c.unpack("QQ")
            meta, types, lengths = {}, {}, {}
            for _ in range(n_kv):
                key = c.string()
                (vtype,) = c.unpack("I")
                value, n, etype = c.value(vtype)
                meta[key] = value
                types[key] = (GGUFValueType(vtype),) if etype is None else (GGUFValueType.ARRAY, etype)
                if n is not None:
                    lengths[key] = n
            infos = []
            for _ in range(n_tensors):
                name = c.string()
                (n_dims,) = c.unpack("I")
                if n_dims > MAX_DIMS:
                    raise FormatError(f"{path}: tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")
                shape = c.unpack("Q" * n_dims)
                ttype, offset = c.unpack("IQ")
                infos.append((name, tuple(int(x) for x in shape), ttype, offset))
            header_end = f.tell()
    except (EOFError, ValueError, UnicodeDecodeError, struct.error, OverflowError, MemoryError) as e:
        raise FormatError(f"{path}: truncated or corrupt GGUF header ({e or 'unexpected end of file'})") from None

    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
        raise FormatError(f"{path}: general.alignment {alignment!r} is not a positive multiple of 8")
    data_offset = -(-header_end // alignment) * alignment
    tensors = {}
    expected_offset = 0  # as llama.cpp's reader: the tensors' data in file order, each aligned
    for name, shape, ttype, offset in infos:
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise FormatError(f"{path}: tensor {name} has unknown type {ttype}") from None
        n_elements, extent = 1, 1
        for d in shape:  # Python integers: no overflow, whatever the header claims
            n_elements *= d
            extent *= max(d, 1)
        if extent >= 2**63:
            raise FormatError(f"{path}: tensor {name} has an impossible shape {list(shape)}")
        if shape and shape[0] % block:
            raise FormatError(f"{path}: tensor {name} has rows of {shape[0]}, not a multiple of the "
                              f"{qtype.name} block size {block}")
        nbytes = n_elements // block * type_size
        if offset != expected_offset:
            raise FormatError(f"{path}: tensor {name} has data offset {offset}, expected {expected_offset} "
                              f"(the tensors' data in order, each aligned to {alignment} bytes)")
        expected_offset += -(-nbytes // alignment) * alignment
        start = data_offset + offset
        if start + nbytes > size:
            raise FormatError(f"{path}: tensor {name} ({qtype.name} {list(shape)}) lies beyond the end of the file "
                              f"(bytes {start}..{start + nbytes}, file size {size}): truncated?")
        if name in tensors:
            raise FormatError(f"{path}: tensor {name} appears twice")
        tensors[name] = TensorInfo(name, shape, qtype, start, nbytes)
    return GGUFHeader(path, version, meta, types, lengths, tensors, size, data_offset)
