"""A corpus of flow GGUF files gone wrong, made from one good file (tests/test_bad_files.py).

`make_corpus(good, out_dir, n_layer, n_embd)` writes the files and returns one `Case` per file.
Kinds:

    truncated   the good file cut at many offsets (inside the header, the metadata, the tensor
                infos, the data)
    header      fields of the binary header overwritten in place: magic, version, tensor and key
                counts, string lengths, value types, array lengths, dimension counts, dimensions,
                tensor types and data offsets, each with extreme values
    type        LoRA or gate tensors written with a type the format does not allow
    shape       tensors of the wrong shape, three-dimensional, enormous (a header that claims
                2^40 rows)
    k           loraflow.adapter.count and the arrays, ranks and gate shapes disagreeing
    names       adapter names repeated or empty, tensors missing, repeated, unknown, out of range
    nan         NaN and infinity in gates and LoRA tensors (F32, F16, Q8_0)
    base        made for another base: arch, layer count, hidden size
    meta        required keys missing or of the wrong type
    data        what only the digest (loraflow.digest) tells: a byte flipped in tensor data (the
                first tensor, gates, LoRA halves, the last byte), in a metadata value the rules
                accept either way (an alpha, a scale, a name, the temperature), two tensors'
                names swapped, the digest itself changed or of the wrong form

Files are rewritten with gguf-py's writer (a consistent file with one thing wrong, its digest
computed afresh, as a buggy writer would) or patched byte by byte (a header that lies, or bytes
that changed after writing: the digest no longer matches). Every name comes from loraflow.schema.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from loraflow import schema


@dataclass
class Case:
    name: str          # also the file's stem
    kind: str          # one of KINDS
    path: str
    expect: str = ""   # a fragment the runtime's message must hold ("" = the file name only)
    needs_base: bool = False  # only a reader that has the base model can tell (the Python reader may accept it)
    digest_only: bool = False  # only the digest can tell: the C++ loader alone accepts it


KINDS = ("truncated", "header", "type", "shape", "k", "names", "nan", "base", "meta", "data")

# ---- rewriting with gguf-py ------------------------------------------------------------------

_DROP = object()


def read_good(path):
    """(kv, tensors) of a flow file: kv key -> (value, type, sub type), tensors name ->
    (numpy array in numpy order, GGML type); F32, F16 and Q8_0 data kept as stored."""
    r = gguf.GGUFReader(str(path))
    kv = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        kv[name] = (f.contents(), f.types[0], f.types[-1] if f.types[0] == VT.ARRAY else None)
    tensors = {}
    for t in r.tensors:
        shape = [int(d) for d in reversed(t.shape)]
        tensors[t.name] = (np.array(t.data).reshape(shape) if t.tensor_type != QT.Q8_0 else np.array(t.data),
                           t.tensor_type)
    return kv, tensors


def write(dst, kv, tensors, digest=True):
    """Write a GGUF from (kv, tensors) as read_good returns them; kv values may be _DROP. With
    `digest`, the digest of what is written replaces any in kv (the converter's add_digest);
    without, kv's digest key (if any) is written as it is."""
    from loraflow.digest import add_digest

    arch = kv.get(schema.KEY_GENERAL_ARCH, ("llama",))[0]
    w = gguf.GGUFWriter(str(dst), arch if isinstance(arch, str) else "llama")
    w.kv_data[0].pop(schema.KEY_GENERAL_ARCH, None)  # written below with its (maybe wrong) type
    for key, (value, vtype, sub) in kv.items():
        if value is _DROP or (digest and key == schema.KEY_DIGEST):
            continue
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name, (data, ttype) in tensors.items():
        if ttype in (QT.F32, QT.F16):
            w.add_tensor(name, data)
        else:  # raw bytes: rows of bytes, the writer derives the element shape from the type
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=ttype)
    if digest:
        add_digest(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# ---- patching the binary header ----------------------------------------------------------------

def header_fields(data: bytes):
    """[(description, offset, struct format)] of every field in a GGUF header, in file order."""
    out, pos = [], 0

    def take(desc, fmt):
        nonlocal pos
        out.append((desc, pos, fmt))
        (value,) = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return value

    def string(desc):
        nonlocal pos
        n = take(desc + " length", "Q")
        s = data[pos:pos + n].decode()
        pos += n
        return s

    sizes = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
             VT.FLOAT32: "f", VT.BOOL: "?", VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d"}

    def value(desc, vtype):
        if vtype == VT.STRING:
            string(desc)
        elif vtype == VT.ARRAY:
            etype = VT(take(desc + " element type", "I"))
            n = take(desc + " array length", "Q")
            for i in range(n):
                value(f"{desc}[{i}]", etype)
        else:
            take(desc, sizes[vtype])

    take("magic", "I")
    take("version", "I")
    n_tensors = take("tensor count", "Q")
    n_kv = take("key count", "Q")
    for _ in range(n_kv):
        key = string("key")
        out[-1] = (f"key {key} length", *out[-1][1:])
        vtype = VT(take(f"{key} value type", "I"))
        value(key, vtype)
    for _ in range(n_tensors):
        name = string("tensor name")
        out[-1] = (f"tensor {name} name length", *out[-1][1:])
        n_dims = take(f"tensor {name} n_dims", "I")
        for d in range(n_dims):
            take(f"tensor {name} ne[{d}]", "Q")
        take(f"tensor {name} type", "I")
        take(f"tensor {name} offset", "Q")
    return out, pos


def patched(data: bytes, offset: int, fmt: str, value) -> bytes:
    buf = bytearray(data)
    struct.pack_into("<" + fmt, buf, offset, value)
    return bytes(buf)


# ---- the corpus ---------------------------------------------------------------------------------

def make_corpus(good, out_dir, n_layer: int, n_embd: int) -> list[Case]:
    good, out_dir = Path(good), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    kv, tensors = read_good(good)
    k = kv[schema.KEY_ADAPTER_COUNT][0]
    ranks = list(kv[schema.KEY_ADAPTER_RANKS][0])
    R = sum(ranks)
    lora_names = [n for n in tensors if n.endswith((".flow_a", ".flow_b"))]
    a0 = next(n for n in lora_names if n.endswith(".flow_a"))
    b0 = a0[:-1] + "b"
    gw0, gb0 = schema.TENSOR_GATE_WEIGHT.format(bid=0), schema.TENSOR_GATE_BIAS.format(bid=0)
    gw_last = schema.TENSOR_GATE_WEIGHT.format(bid=n_layer - 1)
    cases: list[Case] = []

    def add_bytes(kind, name, content: bytes, expect="", digest_only=False):
        path = out_dir / f"{kind}-{name}.gguf"
        path.write_bytes(content)
        cases.append(Case(f"{kind}-{name}", kind, str(path), expect, digest_only=digest_only))

    def add(kind, name, expect="", kv_set=None, drop_kv=(), drop=(), replace=None, extra=None, order=None,
            needs_base=False, digest=True, digest_only=False):
        """A consistent file from the good one with keys set/dropped and tensors dropped/replaced/added."""
        kv2 = dict(kv)
        for key, v in (kv_set or {}).items():
            kv2[key] = v
        for key in drop_kv:
            kv2[key] = (_DROP, None, None)
        t2 = {n: v for n, v in tensors.items() if n not in drop}
        t2.update(replace or {})
        t2.update(extra or {})
        if order:
            t2 = {n: t2[n] for n in order(list(t2))}
        path = out_dir / f"{kind}-{name}.gguf"
        write(path, kv2, t2, digest=digest)
        cases.append(Case(f"{kind}-{name}", kind, str(path), expect, needs_base or kind in ("nan", "base"),
                          digest_only))

    def f32(*shape, fill=0.0):
        return np.full(shape, fill, dtype=np.float32), QT.F32

    # truncated: 70 offsets over the whole file, denser in the header
    fields, header_end = header_fields(data)
    cuts = {0, 1, 3, 4, 7, 8, 12, 16, 20, 23, 24, header_end - 1, header_end, len(data) - 1, len(data) - 4}
    cuts |= {int(x) for x in np.linspace(25, header_end, 30)}
    cuts |= {int(x) for x in np.linspace(header_end, len(data) - 1, 30)}
    for cut in sorted(c for c in cuts if 0 <= c < len(data)):
        add_bytes("truncated", f"at{cut}", data[:cut])

    # header: each field with values no valid file has there
    chosen = tuple(f"tensor {n} " for n in (gw0, gb0, gw_last, a0, b0))
    for desc, off, fmt in fields:
        if desc.startswith("tensor ") and not desc.startswith(chosen):
            continue
        slug = desc.replace(" ", "_").replace("[", "").replace("]", "")
        if desc == "magic":
            values = [0x46554747 ^ 0xFF, 0]
        elif desc == "version":
            values = [0, 1, 4, 0xFFFFFFFF]
        elif desc in ("tensor count", "key count"):
            (orig,) = struct.unpack_from("<Q", data, off)
            values = [orig + 1, 2**32, 2**63 - 1, 2**64 - 1]
            if desc == "key count":
                values.append(orig - 1)  # stops before the last key: the tensor infos read as keys
        elif desc.endswith("length"):  # string and array lengths
            values = [2**40, 2**63 - 1, 2**64 - 1]
        elif desc.endswith("value type") or desc.endswith("element type"):
            values = [13, 0xFFFFFFFF]
        elif desc.endswith("n_dims"):
            values = [0, 5, 2**31, 0xFFFFFFFF]
        elif "ne[" in desc:
            values = [0, 2**40, 2**62, 2**63 - 1, 2**64 - 1]
        elif desc.endswith(" type") and desc.startswith("tensor "):
            values = [1, 2, 8, 30, 39, 1000, 0xFFFFFFFF]
        elif desc.endswith("offset"):
            values = [1, len(data), 2**62, 2**64 - 32]
        else:
            continue  # scalar values: the metadata cases below change them consistently
        for v in values:
            add_bytes("header", f"{slug}={v:x}", patched(data, off, fmt, v))

    # the largest shape llama.cpp's GGUF reader let through (ne[0] * ne[1] just past INT64_MAX in
    # ggml's own check): ggml_new_tensor aborted on it before the patch (a fuzz finding)
    for desc, off, fmt in fields:
        if desc == f"tensor {a0} ne[0]":
            add_bytes("header", "flow_a-ne0=int64max-over-R", patched(data, off, fmt, (2**63 - 1) // R))

    # type: LoRA tensors and gates in types the format does not allow
    a_data = tensors[a0][0]
    for qt in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_1, QT.BF16, QT.I8, QT.I16, QT.I32, QT.F64):
        try:
            raw = gguf.quants.quantize(a_data.astype(np.float32), qt) if qt not in (QT.I8, QT.I16, QT.I32, QT.F64) else \
                a_data.astype({QT.I8: np.int8, QT.I16: np.int16, QT.I32: np.int32, QT.F64: np.float64}[qt]).view(np.uint8).reshape(
                    a_data.shape[0], -1)
        except (NotImplementedError, ValueError, gguf.quants.QuantError):
            continue
        add("type", f"flow_a-{qt.name}", "type", replace={a0: (raw, qt)})
    gate_w = tensors[gw0][0]
    add("type", "gate-F16", "f32", replace={gw0: (gate_w.astype(np.float16), QT.F16)})
    add("type", "gate-bias-F16", "f32", replace={gb0: (tensors[gb0][0].astype(np.float16), QT.F16)})
    add("type", "gate-Q8_0", "f32", replace={gw0: (gguf.quants.quantize(gate_w, QT.Q8_0), QT.Q8_0)})
    add("type", "gate-BF16", "f32", replace={gw0: (gguf.quants.quantize(gate_w, QT.BF16), QT.BF16)})

    # shape
    n_in = tensors[a0][0].shape[1]
    n_out = tensors[b0][0].shape[0]
    add("shape", "flow_a-transposed", a0, replace={a0: f32(n_in, R)})
    add("shape", "flow_a-R+1", a0, replace={a0: f32(R + 1, n_in)})
    add("shape", "flow_a-n_in+32", a0, replace={a0: f32(R, n_in + 32)})
    add("shape", "flow_a-3d", a0, replace={a0: f32(2, R, n_in)})
    add("shape", "flow_a-1d", a0, replace={a0: f32(R * n_in)})
    add("shape", "flow_b-R-1", b0, replace={b0: f32(n_out, R - 1)})
    add("shape", "flow_b-n_out+1", b0, replace={b0: f32(n_out + 1, R)}, needs_base=True)  # q's n_out: the base's
    add("shape", "flow_b-transposed", b0, replace={b0: f32(R, n_out)})
    add("shape", "gate-transposed", gw0, replace={gw0: f32(n_embd, k)})
    add("shape", "gate-n_embd+1", gw0, replace={gw0: f32(k, n_embd + 1)})
    add("shape", "gate-3d", gw0, replace={gw0: f32(2, k, n_embd)})
    add("shape", "bias-k+1", gb0, replace={gb0: f32(k + 1)})
    add("shape", "bias-2d", gb0, replace={gb0: f32(2, k)})
    add("shape", "empty-flow_a", a0, replace={a0: (np.zeros((0, n_in), np.float32), QT.F32)})
    # enormous: the header claims 2^40 rows of flow_a; consistent otherwise (the data is missing)
    for rows in (2**24, 2**40, 2**55):
        path = out_dir / f"shape-enormous-{rows:x}.gguf"
        w = gguf.GGUFWriter(str(path), kv[schema.KEY_GENERAL_ARCH][0])
        w.kv_data[0].pop(schema.KEY_GENERAL_ARCH, None)
        for key, (value, vtype, sub) in kv.items():
            w.add_key_value(key, value, vtype, sub_type=sub)
        for name, (arr, ttype) in tensors.items():
            if name == a0:
                w.add_tensor_info(name, (rows, n_in), np.dtype(np.float32), rows * n_in * 4)
            else:
                w.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        cases.append(Case(path.stem, "shape", str(path)))

    # k
    u32 = VT.UINT32
    for bad_k in (0, 1, k + 1, 64, 65, 2**32 - 1):
        if bad_k != k:
            add("k", f"count={bad_k}", "", kv_set={schema.KEY_ADAPTER_COUNT: (bad_k, u32, None)})
    names = list(kv[schema.KEY_ADAPTER_NAMES][0])
    add("k", "names-k+1", schema.KEY_ADAPTER_NAMES,
        kv_set={schema.KEY_ADAPTER_NAMES: (names + ["extra"], VT.ARRAY, VT.STRING)})
    add("k", "names-k-1", schema.KEY_ADAPTER_NAMES,
        kv_set={schema.KEY_ADAPTER_NAMES: (names[:-1], VT.ARRAY, VT.STRING)})
    add("k", "ranks-short", schema.KEY_ADAPTER_RANKS,
        kv_set={schema.KEY_ADAPTER_RANKS: (ranks[:-1], VT.ARRAY, u32)})
    add("k", "alphas-long", schema.KEY_ADAPTER_ALPHAS,
        kv_set={schema.KEY_ADAPTER_ALPHAS: ([1.0] * (k + 1), VT.ARRAY, VT.FLOAT32)})
    add("k", "scales-short", schema.KEY_ADAPTER_SCALES,
        kv_set={schema.KEY_ADAPTER_SCALES: ([1.0] * (k - 1 or 2), VT.ARRAY, VT.FLOAT32)})
    for rs in ([r + 1 for r in ranks], [ranks[0] - 1] + ranks[1:], [0] + ranks[1:], [2**31] + ranks[1:],
               [2**32 - 1] * k, [R] + [0] * (k - 1)):
        add("k", "ranks=" + "_".join(map(str, rs)), "", kv_set={schema.KEY_ADAPTER_RANKS: (rs, VT.ARRAY, u32)})
    add("k", "gates-k+1", schema.TENSOR_GATE_WEIGHT.format(bid=n_layer - 1),
        replace={schema.TENSOR_GATE_WEIGHT.format(bid=n_layer - 1): f32(k + 1, n_embd)})
    add("k", "all-gates-k+1", "", replace={
        **{schema.TENSOR_GATE_WEIGHT.format(bid=l): f32(k + 1, n_embd) for l in range(n_layer)},
        **{schema.TENSOR_GATE_BIAS.format(bid=l): f32(k + 1) for l in range(n_layer)}})
    add("k", "k+1-consistent-metadata", "", kv_set={
        schema.KEY_ADAPTER_COUNT: (k + 1, u32, None),
        schema.KEY_ADAPTER_NAMES: (names + ["extra"], VT.ARRAY, VT.STRING),
        schema.KEY_ADAPTER_RANKS: (ranks + [1], VT.ARRAY, u32),
        schema.KEY_ADAPTER_ALPHAS: ([1.0] * (k + 1), VT.ARRAY, VT.FLOAT32),
        schema.KEY_ADAPTER_SCALES: ([1.0] * (k + 1), VT.ARRAY, VT.FLOAT32)})

    # names: adapters and tensors
    add("names", "adapters-repeat", "unique", kv_set={schema.KEY_ADAPTER_NAMES: ([names[0]] * k, VT.ARRAY, VT.STRING)})
    add("names", "adapter-empty", "empty", kv_set={schema.KEY_ADAPTER_NAMES: ([""] + names[1:], VT.ARRAY, VT.STRING)})
    add("names", "adapter-not-utf8", "UTF-8", needs_base=True,  # the Python reader shows it with U+FFFD
        kv_set={schema.KEY_ADAPTER_NAMES: ([b"\x94" + names[0].encode()] + names[1:], VT.ARRAY, VT.STRING)})
    for l in range(n_layer):
        for t in (schema.TENSOR_GATE_WEIGHT, schema.TENSOR_GATE_BIAS):
            name = t.format(bid=l)
            add("names", f"missing-{name}", name, drop={name})
    add("names", f"missing-{a0}", "no flow_a", drop={a0})
    add("names", f"missing-{b0}", "no flow_b", drop={b0})
    add("names", "missing-all-lora", "no LoRA", drop=set(lora_names))
    add("names", "missing-everything", "", drop=set(tensors))
    add("names", "extra-token_embd", "token_embd", extra={"token_embd.weight": f32(8, n_embd)})
    add("names", "extra-lora_a", "unexpected", extra={"blk.0.attn_q.weight.lora_a": f32(4, n_embd)})
    add("names", "layer-out-of-range", f"blk.{n_layer}", extra={
        schema.TENSOR_GATE_WEIGHT.format(bid=n_layer): f32(k, n_embd)})
    add("names", "layer-negative", "blk.-1", extra={"blk.-1.flow_gate.bias": f32(k)})
    add("names", "layer-huge", "blk.99999999999", extra={"blk.99999999999.flow_gate.bias": f32(k)})
    # a module of another architecture (fused qkv on a llama base): only the base can tell
    add("names", "module-of-another-arch", "attn_qkv", needs_base=True,
        extra={"blk.0.attn_qkv.flow_a": f32(R, n_embd), "blk.0.attn_qkv.flow_b": f32(3 * n_embd, R)})
    add("names", "module-not-in-base", "", extra={"blk.0.attn_q_norm.flow_a": f32(R, n_embd)})
    add("names", "suffix-only", "", extra={"blk.0..flow_a": f32(R, n_embd)})
    add("names", "no-layer", "", extra={"flow_gate.weight": f32(k, n_embd)})
    # tensor names repeated: rename one tensor in the header to the name of another of equal length
    for src, dst in ((gb0, schema.TENSOR_GATE_BIAS.format(bid=n_layer - 1)), (b0, a0)):
        if len(src) == len(dst) and src != dst:
            add_bytes("names", f"repeat-{dst}", data.replace(src.encode(), dst.encode(), 1), "")

    # nan: in gates (weight, bias) and LoRA tensors as F32, F16 and Q8_0
    for where, value in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
        for name in (gw0, gb0, gw_last, a0, b0):
            arr = tensors[name][0].copy()
            arr.flat[arr.size // 2] = value
            add("nan", f"{where}-{name}", name, replace={name: (arr, QT.F32)})
        arr = tensors[a0][0].astype(np.float16)
        arr.flat[3] = value
        add("nan", f"{where}-f16-{a0}", a0, replace={a0: (arr, QT.F16)})
        raw = gguf.quants.quantize(tensors[a0][0].astype(np.float32), QT.Q8_0)
        raw[0, 0:2] = np.array([value], dtype=np.float16).view(np.uint8)  # the first block's scale
        add("nan", f"{where}-q8_0-scale-{a0}", a0, replace={a0: (raw, QT.Q8_0)})
    for t, v in (("nan", float("nan")), ("inf", float("inf")), ("zero", 0.0), ("negative", -1.0)):
        add("nan", f"temperature-{t}", schema.KEY_GATE_TEMPERATURE,
            kv_set={schema.KEY_GATE_TEMPERATURE: (v, VT.FLOAT32, None)})

    # base: another arch, layer count, hidden size
    arch = kv[schema.KEY_GENERAL_ARCH][0]
    for other in ("qwen2", "qwen3", "gemma3", "phi3", "", "LLAMA", "llama "):
        if other != arch:
            add("base", f"arch-{other.encode().hex() if not other.isalnum() else other}", "",
                kv_set={schema.KEY_GENERAL_ARCH: (other, VT.STRING, None)})
    for key, values in ((schema.KEY_N_LAYER, (0, n_layer - 1, n_layer + 1, 2**32 - 1)),
                        (schema.KEY_N_EMBD, (0, n_embd // 2, n_embd * 2, 2**32 - 1))):
        for v in values:
            add("base", f"{key}={v}", "layers", kv_set={key: (v, u32, None)})
    add("base", "general.type=model", "not a LoRA-Flow", kv_set={schema.KEY_GENERAL_TYPE: ("model", VT.STRING, None)})
    add("base", "adapter.type=lora", "not a LoRA-Flow", kv_set={schema.KEY_ADAPTER_TYPE: ("lora", VT.STRING, None)})
    add("base", "version=2", "version", kv_set={schema.KEY_VERSION: (2, u32, None)})
    add("base", "version=0", "version", kv_set={schema.KEY_VERSION: (0, u32, None)})
    add("base", "gate.input=normed", "gate input", kv_set={schema.KEY_GATE_INPUT: ("normed", VT.STRING, None)})

    # meta: every required key missing, or of another type
    required = (schema.KEY_GENERAL_TYPE, schema.KEY_GENERAL_ARCH, schema.KEY_ADAPTER_TYPE, schema.KEY_VERSION,
                schema.KEY_N_LAYER, schema.KEY_N_EMBD, schema.KEY_ADAPTER_COUNT, schema.KEY_ADAPTER_NAMES,
                schema.KEY_ADAPTER_RANKS, schema.KEY_ADAPTER_ALPHAS, schema.KEY_ADAPTER_SCALES,
                schema.KEY_GATE_TEMPERATURE, schema.KEY_GATE_INPUT)
    for key in required:
        add("meta", f"missing-{key}", key, drop_kv={key})
        value, vtype, sub = kv[key]
        if vtype == VT.STRING:
            wrong = [(7, VT.UINT32, None), ([value], VT.ARRAY, VT.STRING)]
        elif vtype == VT.UINT32:
            wrong = [(value, VT.INT32, None), (value, VT.UINT64, None), (float(value), VT.FLOAT32, None),
                     (str(value), VT.STRING, None), ([value], VT.ARRAY, VT.UINT32)]
        elif vtype == VT.FLOAT32:
            wrong = [(value, VT.FLOAT64, None), (1, VT.UINT32, None), (str(value), VT.STRING, None)]
        else:  # arrays
            elems = list(value)
            wrong = [(len(elems), VT.UINT32, None), (",".join(map(str, elems)), VT.STRING, None)]
            if sub == VT.STRING:
                wrong.append(([len(e) for e in elems], VT.ARRAY, VT.UINT32))
            elif sub == VT.UINT32:
                wrong += [(elems, VT.ARRAY, VT.INT32), (elems, VT.ARRAY, VT.UINT64), ([str(e) for e in elems], VT.ARRAY, VT.STRING)]
            else:
                wrong += [(elems, VT.ARRAY, VT.FLOAT64), ([int(e) for e in elems], VT.ARRAY, VT.UINT32)]
        for value2, vtype2, sub2 in wrong:
            tname = vtype2.name + (f"-{sub2.name}" if sub2 is not None else "")
            add("meta", f"{key}-as-{tname}", key, kv_set={key: (value2, vtype2, sub2)})

    # data: bytes changed after writing where no rule of the format can see it (every one of these
    # loads through the C++ loader alone); the digest must refuse them all
    from loraflow.gguf_read import read_header

    if schema.KEY_DIGEST not in kv:
        raise ValueError(f"{good}: the good file has no {schema.KEY_DIGEST}")
    infos = read_header(good).tensors

    def flipped(pos: int, mask: int = 0x01) -> bytes:
        buf = bytearray(data)
        buf[pos] ^= mask
        return bytes(buf)

    def flip_data(name, what, pos):  # the lowest bit of a byte: a weight that changes a little
        add_bytes("data", f"flip-{what}-{name}", flipped(pos), "digest mismatch", digest_only=True)

    first, last = next(iter(infos.values())), list(infos.values())[-1]
    flip_data(first.name, "first-byte", first.offset)
    for name in (gb0, gw_last, a0, b0):
        flip_data(name, "middle", infos[name].offset + infos[name].nbytes // 2)
    flip_data(last.name, "last-byte", last.offset + last.nbytes - 1)
    offsets = {desc: off for desc, off, _ in fields}
    for key in (f"{schema.KEY_ADAPTER_ALPHAS}[0]", f"{schema.KEY_ADAPTER_SCALES}[{k - 1}]",
                schema.KEY_GATE_TEMPERATURE):
        add_bytes("data", f"flip-{key}", flipped(offsets[key]), "digest mismatch", digest_only=True)
    # a name's first letter, one bit off (another valid, unique name: 'math' -> 'lath')
    add_bytes("data", f"flip-{schema.KEY_ADAPTER_NAMES}[{k - 1}]",
              flipped(offsets[f"{schema.KEY_ADAPTER_NAMES}[{k - 1}] length"] + 8), "digest mismatch", digest_only=True)
    # two tensors of one shape trade names (layer 0's gate or LoRA gets the last layer's data)
    for x in (gw0, a0):
        y = x.replace("blk.0.", f"blk.{n_layer - 1}.", 1)
        if y != x and y in infos and len(y) == len(x):
            i, j = data.index(x.encode()), data.index(y.encode())  # in the tensor infos
            buf = bytearray(data)
            buf[i:i + len(x)], buf[j:j + len(y)] = y.encode(), x.encode()
            add_bytes("data", f"swapped-{x}-{y}", bytes(buf), "digest mismatch", digest_only=True)
    # the digest itself: one hex digit changed, or a value of the wrong form
    at = data.index(kv[schema.KEY_DIGEST][0].encode()) + len(schema.DIGEST_PREFIX)
    digit = b"1" if data[at:at + 1] != b"1" else b"2"
    add_bytes("data", "digest-one-digit-changed", data[:at] + digit + data[at + 1:], "digest mismatch",
              digest_only=True)
    hex64 = kv[schema.KEY_DIGEST][0][len(schema.DIGEST_PREFIX):]
    for slug, value in (("md5", (f"md5:{hex64[:32]}", VT.STRING, None)),
                        ("no-prefix", (hex64, VT.STRING, None)),
                        ("63-digits", (schema.DIGEST_PREFIX + hex64[:63], VT.STRING, None)),
                        ("uppercase", (schema.DIGEST_PREFIX + hex64.upper().replace("0", "A"), VT.STRING, None)),
                        ("empty", ("", VT.STRING, None)),
                        ("uint32", (7, VT.UINT32, None)),
                        ("array", ([kv[schema.KEY_DIGEST][0]], VT.ARRAY, VT.STRING))):
        add("data", f"digest-{slug}", schema.KEY_DIGEST, kv_set={schema.KEY_DIGEST: value}, digest=False,
            digest_only=True)
    return cases


# ---- loading them: a worker process ------------------------------------------------------------

def worker(base: str, cases_json: str, start: int) -> None:
    """Load cases[start:] one after the other against `base`, through the runtime (FlowLlama.set_flow:
    FlowAdapter: the C++ loader, then the digest), the C++ loader alone (FlowAdapter with
    check_digest=False) and the Python reader (`loraflow-convert inspect`, then `inspect --verify`'s
    check_digest), and print one JSON line when a case starts and one with its outcomes. A crash
    shows as a start line without an outcome line."""
    import json

    from loraflow.converter.flow_file import read_flow_file
    from loraflow.converter.summary import inspect_gguf
    from loraflow.digest import check_digest
    from loraflow.errors import LoraFlowError
    from loraflow.runtime import FlowAdapter, FlowLlama

    def outcome(fn):
        try:
            fn()
            return {"ok": True}
        except LoraFlowError as e:
            return {"ok": False, "error": type(e).__name__, "lf": True, "message": str(e)}
        except Exception as e:  # noqa: BLE001 - reported, and the test fails on it
            return {"ok": False, "error": type(e).__name__, "lf": False, "message": str(e)}

    cases = json.loads(Path(cases_json).read_text())
    llm = FlowLlama(base, n_ctx=64, n_threads=1, verbose=False)
    for i in range(start, len(cases)):
        path = cases[i]["path"]
        print(json.dumps({"i": i, "start": True}), flush=True)
        runtime = outcome(lambda: llm.set_flow(path))
        if runtime["ok"]:
            llm._detach()
        native = outcome(lambda: FlowAdapter(llm.model, path, check_digest=False).free())
        python = outcome(lambda: (read_flow_file(path), inspect_gguf(path), check_digest(path)))
        print(json.dumps({"i": i, "runtime": runtime, "native": native, "python": python}), flush=True)
    llm.close()


if __name__ == "__main__":
    import sys

    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
