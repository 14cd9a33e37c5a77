"""`loraflow-convert inspect`: what a GGUF holds, without loading a model.

Three kinds of file are summarised: a LoRA-Flow file (adapters, ranks, scales, coverage,
tensor types, gate statistics per layer), a stock llama.cpp LoRA (what `export-lora` writes)
and a base model. `inspect_gguf` returns plain JSON-ready data; `format_summary` renders it.
Everything is read with loraflow.gguf_read (headers without parsing the vocabulary, tensor
data only for the small flow and LoRA files).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import gguf
import numpy as np

from loraflow import schema
from loraflow.converter.flow_file import is_flow_file, read_flow_file
from loraflow.digest import check_digest
from loraflow.errors import FormatError
from loraflow.gguf_read import GGUFHeader, read_header

_LORA_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.weight\.lora_([ab])$")


def inspect_gguf(path) -> dict:
    header = read_header(path)
    if is_flow_file(header):
        return _inspect_flow(header)
    meta = header.meta
    if meta.get(schema.KEY_GENERAL_TYPE) == "adapter" and meta.get(schema.KEY_ADAPTER_TYPE) == "lora":
        return _inspect_lora(header)
    return _inspect_model(header)


def verify_digest(path) -> str:
    """`inspect --verify`: the file's digest when its contents match it; a FormatError naming the
    file when they do not, or when it has none (nothing to verify: loading accepts such a file
    with a notice, but a check that passes must mean the bytes are the ones written)."""
    digest = check_digest(path)
    if digest is None:
        raise FormatError(f"{path}: no {schema.KEY_DIGEST} (written before flow files carried one): nothing "
                          "to verify; loraflow.digest.stamp_digest adds one")
    return digest


# ---- data --------------------------------------------------------------------------------

def _common(h: GGUFHeader, kind: str) -> dict:
    return {"file": str(h.path), "kind": kind, "file_size": h.file_size, "gguf_version": h.version,
            "arch": h.meta.get(schema.KEY_GENERAL_ARCH)}


def _tensor_list(h: GGUFHeader) -> list[dict]:
    return [{"name": t.name, "type": t.type.name, "shape": list(t.shape), "bytes": t.nbytes}
            for t in h.tensors.values()]


def _type_histogram(h: GGUFHeader) -> dict:
    out: dict[str, dict] = {}
    for t in h.tensors.values():
        e = out.setdefault(t.type.name, {"count": 0, "bytes": 0, "elements": 0})
        e["count"] += 1
        e["bytes"] += t.nbytes
        e["elements"] += t.n_elements
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))


def _is_rslora(alpha: float, rank: int, scale: float) -> bool:
    return rank > 1 and math.isclose(scale, alpha / math.sqrt(rank), rel_tol=1e-5) \
        and not math.isclose(scale, alpha / rank, rel_tol=1e-5)


def _inspect_flow(h: GGUFHeader) -> dict:
    f = read_flow_file(h.path, header=h)
    coverage = f.coverage()
    d = _common(h, "lora_flow")
    d.update({
        "format_version": f.version, "n_layer": f.n_layer, "n_embd": f.n_embd, "k": f.k,
        "temperature": f.temperature, "gate_input": f.gate_input, "R": sum(f.ranks), "lora_pairs": len(f.pairs),
        "digest": h.meta.get(schema.KEY_DIGEST),
        "adapters": [
            {"slot": i, "name": f.names[i], "rank": f.ranks[i], "alpha": f.alphas[i], "scale": f.scales[i],
             "rslora": _is_rslora(f.alphas[i], f.ranks[i], f.scales[i]),
             "layers_covered": len(coverage[i]), "pairs_covered": sum(map(len, coverage[i].values())),
             "modules": {str(layer): mods for layer, mods in coverage[i].items()}}
            for i in range(f.k)],
        "tensor_types": _type_histogram(h),
        "gates": [],
        "tensors": _tensor_list(h),
    })
    for layer in range(f.n_layer):
        w, b = f.gate(layer)
        d["gates"].append({"layer": layer, "weight_norm": float(np.linalg.norm(w)),
                           "row_norms": [float(x) for x in np.linalg.norm(w, axis=1)],
                           "bias": [float(x) for x in b]})
    return d


def _inspect_lora(h: GGUFHeader) -> dict:
    d = _common(h, "lora")
    ranks, modules = set(), defaultdict(list)
    for t in h.tensors.values():
        m = _LORA_RE.match(t.name)
        if m:
            if m[3] == "a" and len(t.shape) == 2:
                ranks.add(int(t.shape[1]))
                modules[int(m[1])].append(m[2])
    d.update({
        "name": h.meta.get("general.name"),
        "alpha": h.meta.get(gguf.Keys.Adapter.LORA_ALPHA),
        "ranks": sorted(ranks),
        "lora_pairs": sum(map(len, modules.values())),
        "modules": {str(layer): sorted(mods, key=schema.module_sort_key)
                    for layer, mods in sorted(modules.items())},
        "tensor_types": _type_histogram(h),
        "tensors": _tensor_list(h),
    })
    return d


def _inspect_model(h: GGUFHeader) -> dict:
    meta = h.meta
    arch = meta.get(schema.KEY_GENERAL_ARCH)

    def get(key):
        value = meta.get(f"{arch}.{key}")
        if isinstance(value, list) and value and len(set(value)) == 1:
            value = value[0]
        return value

    vocab = get("vocab_size") or h.array_lengths.get("tokenizer.ggml.tokens")
    if vocab is None and "token_embd.weight" in h.tensors:
        vocab = h.tensors["token_embd.weight"].shape[-1]
    ftype = meta.get("general.file_type")
    try:
        ftype_name = gguf.LlamaFileType(ftype).name if ftype is not None else None
    except ValueError:
        ftype_name = str(ftype)
    n_head, n_embd = get("attention.head_count"), get("embedding_length")
    d = _common(h, meta.get(schema.KEY_GENERAL_TYPE, "model"))
    d.update({
        "name": meta.get("general.name"),
        "n_layer": get("block_count"), "n_embd": n_embd, "n_ff": get("feed_forward_length"),
        "n_head": n_head, "n_head_kv": get("attention.head_count_kv") or n_head,
        "head_dim": get("attention.key_length") or (n_embd // n_head if isinstance(n_head, int) and
                                                      isinstance(n_embd, int) and n_head else None),
        "context_length": get("context_length"), "vocab_size": vocab,
        "tokenizer": meta.get("tokenizer.ggml.model"),
        "file_type": ftype_name,
        "n_tensors": len(h.tensors),
        "n_params": int(sum(t.n_elements for t in h.tensors.values())),
        "tensor_types": _type_histogram(h),
        "tensors": _tensor_list(h),
    })
    return d


# ---- text --------------------------------------------------------------------------------

def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _n(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _ranges(layers: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def _coverage_lines(modules: dict[str, list[str]], indent: str) -> list[str]:
    """Layers with the same modules grouped: 'layers 0-29: attn_q attn_k ...'."""
    groups: dict[tuple, list[int]] = {}
    for layer, mods in modules.items():
        groups.setdefault(tuple(mods), []).append(int(layer))
    return [f"{indent}layer{'s' if len(layers) > 1 else ''} {_ranges(layers)}: {' '.join(mods)}"
            for mods, layers in groups.items()]


def _types_lines(types: dict) -> list[str]:
    return [f"  {name:<6} {e['count']:>5} tensors  {_size(e['bytes']):>10}" for name, e in types.items()]


def format_summary(d: dict) -> str:
    kind = d["kind"]
    lines = [f"{d['file']}  ({_size(d['file_size'])}, GGUF v{d['gguf_version']})"]
    if kind == "lora_flow":
        lines += [f"LoRA-Flow file v{d['format_version']}: arch {d['arch']}, {d['n_layer']} layers, "
                  f"n_embd {d['n_embd']}, k = {d['k']} adapters, "
                  f"R = {d['R']} (the ranks summed: rows of each module's A), {d['lora_pairs']} LoRA pairs",
                  f"gate: temperature {d['temperature']:g}, input {d['gate_input']}",
                  f"digest: {d['digest']} (not checked here: --verify checks it)" if d.get("digest") is not None
                  else "digest: none (written before flow files carried one)", "", "adapters:"]
        for a in d["adapters"]:
            rs = " (rsLoRA: alpha/sqrt(r))" if a["rslora"] else ""
            lines.append(f"  [{a['slot']}] {a['name']}: rank {a['rank']}, alpha {a['alpha']:g}, "
                         f"scale {a['scale']:.6g}{rs}; {_n(a['pairs_covered'], 'module')} "
                         f"in {_n(a['layers_covered'], 'layer')}")
            lines += _coverage_lines(a["modules"], "      ")
        lines += ["", "tensor types:"] + _types_lines(d["tensor_types"])
        shapes: dict[tuple, int] = defaultdict(int)
        for t in d["tensors"]:
            if t["name"].endswith(("flow_a", "flow_b")):
                _, _, module, half = t["name"].split(".")
                shapes[(module, half, t["type"], tuple(t["shape"]))] += 1
        lines.append("LoRA tensors (ggml shapes):")
        for (module, half, ttype, shape), n in shapes.items():
            lines.append(f"  {module + '.' + half:<20} {ttype:<5} {list(shape)} x {n}")
        k = d["k"]
        lines += ["", "gates per layer: |W| (Frobenius), |W_i| per adapter row, bias b_i"]
        header = f"  {'layer':>5} {'|W|':>9}  " + " ".join(f"{'|W_' + str(i) + '|':>9}" for i in range(k)) \
            + "   " + " ".join(f"{'b_' + str(i):>8}" for i in range(k))
        lines.append(header)
        for g in d["gates"]:
            lines.append(f"  {g['layer']:>5} {g['weight_norm']:>9.4g}  "
                         + " ".join(f"{x:>9.4g}" for x in g["row_norms"]) + "   "
                         + " ".join(f"{x:>8.4g}" for x in g["bias"]))
    elif kind == "lora":
        lines += [f"stock llama.cpp LoRA: arch {d['arch']}, name {d['name']!r}, alpha {d['alpha']}, "
                  f"rank {', '.join(map(str, d['ranks']))}, {d['lora_pairs']} LoRA pairs"]
        lines += _coverage_lines(d["modules"], "  ")
        lines += ["", "tensor types:"] + _types_lines(d["tensor_types"])
    else:
        lines += [f"{kind}: arch {d['arch']}, name {d['name']!r}, file type {d['file_type']}",
                  f"  layers {d['n_layer']}, n_embd {d['n_embd']}, n_ff {d['n_ff']}, heads {d['n_head']} "
                  f"(kv {d['n_head_kv']}, head_dim {d['head_dim']}), context {d['context_length']}",
                  f"  vocabulary {d['vocab_size']} ({d['tokenizer']}), {d['n_tensors']} tensors, "
                  f"{d['n_params'] / 1e6:.1f}M parameters", "", "tensor types:"]
        lines += _types_lines(d["tensor_types"])
    return "\n".join(lines)
