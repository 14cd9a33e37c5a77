"""The flow file's digest (`loraflow.digest`, docs/FORMAT.md *Digest*): SHA-256 over every key
and value of the metadata but the digest itself and over every tensor's name, type, shape and
bytes, in file order.

GGUF has no checksum: a flipped byte in a tensor loads and computes other numbers silently. The
converter computes the digest before writing (`add_digest`, from what the GGUFWriter holds: the
bytes it is about to write, quantized as stored), the runtime checks it before loading
(`check_digest`, streaming the file through a memory map), and `stamp_digest` adds one to a
file written before digests existed, copying its tensor data byte for byte.

The bytes hashed are the file's own encoding of each entry (GGUF is little endian, every string
and array length-prefixed), so a checker hashes slices of the file; only the counts, each
tensor's byte count and the order are added around them.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

from gguf import GGUFValueType as VT

from loraflow import schema
from loraflow.errors import FormatError
from loraflow.gguf_read import DEFAULT_ALIGNMENT, GGUFHeader, read_header

_DIGEST_RE = re.compile("^" + re.escape(schema.DIGEST_PREFIX) + "[0-9a-f]{64}$")
_KEY = schema.KEY_DIGEST.encode()
_SCALAR = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
           VT.FLOAT32: "f", VT.BOOL: "?", VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d"}
_CHUNK = 16 << 20  # bytes hashed per update: the memory map is read in pieces


def _u32(n: int) -> bytes:
    return struct.pack("<I", n)


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


# ---- the canonical bytes, from values (the writer's side) ------------------------------------

def encode_value(value, vtype: VT, sub_type: VT | None = None) -> bytes:
    """A GGUF value as GGUF stores it (without its type), little endian."""
    vtype = VT(vtype)
    if vtype in _SCALAR:
        return struct.pack("<" + _SCALAR[vtype], value)
    if vtype == VT.STRING:
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        return _u64(len(data)) + data
    if vtype == VT.ARRAY:
        if sub_type is not None:
            sub = VT(sub_type)
        else:  # as gguf's writer infers it
            sub = VT.UINT8 if isinstance(value, bytes) else VT.get_type(value[0])
        return _u32(sub) + _u64(len(value)) + b"".join(encode_value(x, sub) for x in value)
    raise ValueError(f"unknown GGUF value type {vtype}")


def encode_kv(key: str, value, vtype: VT, sub_type: VT | None = None) -> bytes:
    """One metadata pair as GGUF stores it: key (u64 length + UTF-8), u32 value type, value."""
    return encode_value(key, VT.STRING) + _u32(VT(vtype)) + encode_value(value, vtype, sub_type)


def encode_tensor_info(name: str, ggml_shape, ggml_type: int) -> bytes:
    """A tensor info as GGUF stores it, without its data offset: name, u32 n_dims, n_dims u64
    (ggml order, ne[0] first), u32 ggml type."""
    return encode_value(name, VT.STRING) + _u32(len(ggml_shape)) + b"".join(map(_u64, ggml_shape)) + _u32(ggml_type)


def format_digest(h) -> str:
    return schema.DIGEST_PREFIX + h.hexdigest()


def writer_digest(writer) -> str:
    """The digest of what a gguf.GGUFWriter is about to write (one file, every tensor held in
    memory: added with add_tensor, before write_header_to_file). Any digest key it holds is left
    out, as in the file."""
    import numpy as np

    if len(writer.kv_data) != 1 or len(writer.tensors) != 1:
        raise ValueError("a digest covers one GGUF file, not a split one")
    kv = {key: v for key, v in writer.kv_data[0].items() if key != schema.KEY_DIGEST}
    h = hashlib.sha256(_u64(len(kv)))
    for key, v in kv.items():
        h.update(encode_kv(key, v.value, v.type, v.sub_type))
    tensors = writer.tensors[0]
    h.update(_u64(len(tensors)))
    for name, ti in tensors.items():
        if ti.tensor is None:
            raise ValueError(f"{name}: the writer holds no data for it (written already, or a temporary file)")
        h.update(encode_tensor_info(name, tuple(reversed(ti.shape)), ti.dtype))
        h.update(_u64(ti.nbytes))
        h.update(np.ascontiguousarray(ti.tensor).reshape(-1).view(np.uint8))
    return format_digest(h)


def add_digest(writer) -> str:
    """Compute the digest of what `writer` holds and add it as the last key (before
    write_header_to_file); returns it."""
    writer.remove_key(schema.KEY_DIGEST)
    value = writer_digest(writer)
    writer.add_string(schema.KEY_DIGEST, value)
    return value


# ---- the canonical bytes, from the file (the checker's side) ---------------------------------

def _skip_value(buf, pos: int, vtype: int) -> int:
    vtype = VT(vtype)
    if vtype in _SCALAR:
        return pos + struct.calcsize("<" + _SCALAR[vtype])
    if vtype == VT.STRING:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    if vtype == VT.ARRAY:
        etype, n = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if VT(etype) in _SCALAR:
            return pos + n * struct.calcsize("<" + _SCALAR[VT(etype)])
        for _ in range(n):
            pos = _skip_value(buf, pos, etype)
        return pos
    raise ValueError(f"unknown GGUF value type {vtype}")


def _layout(buf, header: GGUFHeader):
    """([(key bytes, start, end)] of every metadata pair, [(start, end)] of every tensor info
    without its offset), byte ranges of the file `buf`, whose header read_header has checked."""
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos, kvs, infos = 24, [], []
    for _ in range(n_kv):
        start = pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        key = bytes(buf[pos + 8:pos + 8 + n])
        (vtype,) = struct.unpack_from("<I", buf, pos + 8 + n)
        pos = _skip_value(buf, pos + 12 + n, vtype)
        kvs.append((key, start, pos))
    for _ in range(n_tensors):
        start = pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos + 8 + n)
        pos += 8 + n + 4 + 8 * n_dims + 4
        infos.append((start, pos))
        pos += 8  # the data offset: not hashed (read_header checks it)
    if len(infos) != len(header.tensors) or pos > header.data_offset:
        raise ValueError("the header does not read the same twice")
    return kvs, infos


def stored_digest(header: GGUFHeader) -> str | None:
    """The file's `loraflow.digest`, checked to be of the form 'sha256:<64 hex digits>'; None
    where the file has none."""
    if schema.KEY_DIGEST not in header.meta:
        return None
    value = header.meta[schema.KEY_DIGEST]
    if header.types[schema.KEY_DIGEST] != (VT.STRING,):
        got = "/".join(t.name.lower() for t in header.types[schema.KEY_DIGEST])
        raise FormatError(f"{header.path}: {schema.KEY_DIGEST} should be a string "
                          f"'{schema.DIGEST_PREFIX}<64 hex digits>', got {got} {_clip(value)}")
    if not _DIGEST_RE.match(value):
        raise FormatError(f"{header.path}: {schema.KEY_DIGEST} is {_clip(value)}, expected "
                          f"'{schema.DIGEST_PREFIX}' and 64 lowercase hex digits")
    return value


def _clip(value) -> str:
    text = repr(value)
    return text if len(text) <= 90 else text[:80] + "...'"


def file_digest(path, header: GGUFHeader | None = None) -> tuple[str | None, str]:
    """(the digest the file records or None, the digest of its contents). The file is read
    through a memory map, 16 MiB at a time; a FormatError if its header is corrupt or the
    recorded digest is not of the right form."""
    header = header or read_header(path)
    stored = stored_digest(header)
    with open(header.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        with memoryview(mm) as buf:
            try:
                kvs, infos = _layout(buf, header)
            except (struct.error, ValueError) as e:
                raise FormatError(f"{header.path}: corrupt GGUF header ({e})") from None
            if sum(key == _KEY for key, _, _ in kvs) > 1:
                raise FormatError(f"{header.path}: {schema.KEY_DIGEST} appears more than once")
            covered = [(s, e) for key, s, e in kvs if key != _KEY]
            h = hashlib.sha256(_u64(len(covered)))
            for s, e in covered:
                h.update(buf[s:e])
            h.update(_u64(len(infos)))
            for (s, e), t in zip(infos, header.tensors.values()):
                h.update(buf[s:e])
                h.update(_u64(t.nbytes))
                for pos in range(t.offset, t.offset + t.nbytes, _CHUNK):
                    h.update(buf[pos:min(pos + _CHUNK, t.offset + t.nbytes)])
    return stored, format_digest(h)


def check_digest(path, header: GGUFHeader | None = None) -> str | None:
    """Check a file against its `loraflow.digest`: the digest when it matches, None when the file
    has none (written before digests existed), a FormatError naming the file when it does not
    match or is not of the right form."""
    header = header or read_header(path)
    if schema.KEY_DIGEST not in header.meta:
        return None
    stored, computed = file_digest(path, header)
    if stored != computed:
        raise FormatError(f"{header.path}: digest mismatch: {schema.KEY_DIGEST} records {stored} but the "
                          f"file hashes to {computed}: the tensor data or metadata changed since it was "
                          "written (a corrupted or edited copy?)")
    return stored


# ---- adding one to an older file -------------------------------------------------------------

def stamp_digest(src, dst=None) -> str:
    """Write `dst` (default: `src`, replaced) as `src` with its digest added as the last key,
    every other byte of the metadata, the tensor infos and the tensor data copied unchanged (the
    data moves as a whole when the header grows; tensor offsets are relative to it). A digest
    `src` already has must match (a mismatch is a FormatError: stamping must not bless a
    corrupted file). Written to a temporary file in `dst`'s folder and renamed. Returns the
    digest; the result is what `loraflow-convert flow` would have written with it."""
    src = Path(src)
    dst = Path(dst) if dst is not None else src
    header = read_header(src)
    if schema.KEY_DIGEST in header.meta:
        check_digest(src, header)
    _, digest = file_digest(src, header)
    alignment = header.meta.get("general.alignment", DEFAULT_ALIGNMENT)
    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        with memoryview(mm) as buf:
            kvs, infos = _layout(buf, header)
            kept = [(s, e) for key, s, e in kvs if key != _KEY]
            out = bytearray(buf[0:8])  # magic, version
            out += _u64(len(infos)) + _u64(len(kept) + 1)
            for s, e in kept:
                out += buf[s:e]
            out += encode_kv(schema.KEY_DIGEST, digest, VT.STRING)
            if infos:  # the tensor infos, offsets included, as they are
                out += buf[infos[0][0]:infos[-1][1] + 8]
            out += bytes(-len(out) % alignment)
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
        try:
            with os.fdopen(fd, "wb") as g:
                g.write(out)
                f.seek(header.data_offset)
                shutil.copyfileobj(f, g, _CHUNK)
            shutil.copymode(src, tmp)
            check_digest(tmp)
            os.replace(tmp, dst)
        except BaseException:
            os.unlink(tmp)
            raise
    return digest
