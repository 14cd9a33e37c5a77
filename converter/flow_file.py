"""Reading a LoRA-Flow GGUF back (docs/FORMAT.md) without the base model: the metadata,
validated, and its tensors as float32, whole or one adapter's slot at a time.

Used by `loraflow-convert inspect` and `export-lora`; the runtime's own reader is the C++
loader, which also checks everything against the base model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFValueType as VT

from loraflow import schema
from loraflow.errors import FormatError
from loraflow.gguf_read import GGUFHeader, TensorInfo, read_header

_PAIR_RE = re.compile(r"^blk\.(\d+)\.(" + schema.MODULE_PATTERN + r")\.(flow_a|flow_b)$")
_GATE_RE = re.compile(r"^blk\.(\d+)\.flow_gate\.(weight|bias)$")
_READS_RESIDUAL = ("attn_q", "attn_k", "attn_v", "attn_qkv", "ffn_gate", "ffn_up")
_WRITES_RESIDUAL = ("attn_output", "ffn_down")


@dataclass
class FlowFile:
    header: GGUFHeader = field(repr=False)
    arch: str
    version: int
    n_layer: int
    n_embd: int
    names: list[str]
    ranks: list[int]
    alphas: list[float]
    scales: list[float]
    temperature: float
    gate_input: str
    # (layer, module) -> (flow_a, flow_b) tensor infos, in file order
    pairs: dict[tuple[int, str], tuple[TensorInfo, TensorInfo]] = field(repr=False)

    @property
    def path(self) -> Path:
        return self.header.path

    @property
    def k(self) -> int:
        return len(self.names)

    @property
    def offsets(self) -> list[int]:
        """Slot i spans rows/columns [offsets[i], offsets[i + 1]) of every concatenated tensor."""
        out = [0]
        for r in self.ranks:
            out.append(out[-1] + r)
        return out

    def slot(self, name: str) -> int:
        if name not in self.names:
            raise FormatError(f"{self.path}: no adapter named {name!r}; the adapters are {self.names}")
        return self.names.index(name)

    def gate(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(W [k, n_embd], b [k]) of a layer's gate."""
        return (self.header.read(schema.TENSOR_GATE_WEIGHT.format(bid=layer)),
                self.header.read(schema.TENSOR_GATE_BIAS.format(bid=layer)))

    def pair(self, layer: int, module: str) -> tuple[np.ndarray, np.ndarray]:
        """(flow_a [R, n_in], flow_b [n_out, R]) float32, scales folded into flow_b as stored."""
        a, b = self.pairs[(layer, module)]
        return self.header.read(a.name), self.header.read(b.name)

    def adapter_pair(self, slot: int, layer: int, module: str, unscale: bool = False):
        """Adapter `slot`'s (A [r, n_in], B [n_out, r]) on (layer, module), or None where the
        adapter does not cover it (its rows and columns are the zero padding). B is s_i * B_i as
        stored, or B_i with `unscale`."""
        a, b = self.pair(layer, module)
        lo, hi = self.offsets[slot], self.offsets[slot + 1]
        a, b = a[lo:hi], b[:, lo:hi]
        if not a.any() and not b.any():
            return None
        if unscale:
            b = b / np.float32(self.scales[slot])
        return np.ascontiguousarray(a), np.ascontiguousarray(b)

    def coverage(self) -> list[dict[int, list[str]]]:
        """Per slot: layer -> the modules that adapter covers (non-zero rows of flow_a or columns
        of flow_b), in layer and module order."""
        out: list[dict[int, list[str]]] = [{} for _ in self.names]
        offsets = self.offsets
        for layer, module in sorted(self.pairs, key=lambda key: (key[0], schema.module_sort_key(key[1]))):
            a, b = self.pair(layer, module)
            for i in range(self.k):
                lo, hi = offsets[i], offsets[i + 1]
                if a[lo:hi].any() or b[:, lo:hi].any():
                    out[i].setdefault(layer, []).append(module)
        return out


def is_flow_file(header: GGUFHeader) -> bool:
    return header.meta.get(schema.KEY_ADAPTER_TYPE) == schema.ADAPTER_TYPE


def read_flow_file(path, header: GGUFHeader | None = None) -> FlowFile:
    """Read and validate a flow file's metadata and tensor layout (FORMAT.md rules 1 and 4-9,
    without the base model; rule 10's NaN check happens when tensors are read for export)."""
    h = header or read_header(path)
    path = h.path
    meta = h.meta

    def need(key, vtype, what, sub=None):
        """The value of `key`, which must have the GGUF type FORMAT.md gives it."""
        if key not in meta:
            raise FormatError(f"{path}: missing key {key}")
        want = (vtype,) if sub is None else (vtype, sub)
        if h.types[key] != want:
            got = "/".join(t.name.lower() for t in h.types[key])
            raise FormatError(f"{path}: {key} should be {what}, got {got} {meta[key]!r}")
        return meta[key]

    gtype = meta.get(schema.KEY_GENERAL_TYPE)
    atype = meta.get(schema.KEY_ADAPTER_TYPE)
    if gtype != "adapter" or atype != schema.ADAPTER_TYPE:
        kind = ("a base model GGUF" if gtype in (None, "model") else
                "a stock llama.cpp LoRA, not a LoRA-Flow file" if atype == "lora" else
                f"general.type={gtype!r}, adapter.type={atype!r}")
        raise FormatError(f"{path}: not a LoRA-Flow file (expected general.type='adapter' and "
                          f"adapter.type='{schema.ADAPTER_TYPE}'): {kind}")
    version = need(schema.KEY_VERSION, VT.UINT32, "a uint32")
    if version != schema.FORMAT_VERSION:
        raise FormatError(f"{path}: {schema.KEY_VERSION} is {version}; this loraflow reads version "
                          f"{schema.FORMAT_VERSION}")
    arch = need(schema.KEY_GENERAL_ARCH, VT.STRING, "a string")  # checked against the base by the runtime
    n_layer = need(schema.KEY_N_LAYER, VT.UINT32, "a uint32")
    n_embd = need(schema.KEY_N_EMBD, VT.UINT32, "a uint32")
    k = need(schema.KEY_ADAPTER_COUNT, VT.UINT32, "a uint32")
    if k < 1:
        raise FormatError(f"{path}: {schema.KEY_ADAPTER_COUNT} is {k}, must be >= 1")
    arrays = {}
    for key, sub in ((schema.KEY_ADAPTER_NAMES, VT.STRING), (schema.KEY_ADAPTER_RANKS, VT.UINT32),
                     (schema.KEY_ADAPTER_ALPHAS, VT.FLOAT32), (schema.KEY_ADAPTER_SCALES, VT.FLOAT32)):
        value = need(key, VT.ARRAY, f"an array of {k} {sub.name.lower()}", sub)
        if value is None or len(value) != k:
            raise FormatError(f"{path}: {key} should be {k} {sub.name.lower()} values, got "
                              f"{h.array_lengths.get(key)}: {value!r}")
        arrays[key] = value
    names, ranks = arrays[schema.KEY_ADAPTER_NAMES], arrays[schema.KEY_ADAPTER_RANKS]
    if len(set(names)) != k or "" in names:
        raise FormatError(f"{path}: adapter names must be unique and non-empty: {names}")
    if any(r < 1 for r in ranks):
        raise FormatError(f"{path}: {schema.KEY_ADAPTER_RANKS} {ranks}: every rank must be >= 1")
    temperature = need(schema.KEY_GATE_TEMPERATURE, VT.FLOAT32, "a float32")
    if not (math.isfinite(temperature) and temperature > 0):
        raise FormatError(f"{path}: {schema.KEY_GATE_TEMPERATURE} is {temperature}, must be finite and > 0")
    gate_input = need(schema.KEY_GATE_INPUT, VT.STRING, "a string")
    if gate_input != schema.GATE_INPUT:
        raise FormatError(f"{path}: {schema.KEY_GATE_INPUT} is {gate_input!r}, expected {schema.GATE_INPUT!r}")

    R = sum(ranks)
    halves: dict[tuple[int, str], dict[str, TensorInfo]] = {}
    gates: dict[int, dict[str, TensorInfo]] = {}
    for name, t in h.tensors.items():
        if (m := _PAIR_RE.match(name)) is not None:
            layer, module, half = int(m[1]), m[2], m[3]
            if layer >= n_layer:
                raise FormatError(f"{path}: tensor {name}: layer {layer} >= n_layer {n_layer}")
            if t.type.name not in schema.LORA_TENSOR_TYPES:
                raise FormatError(f"{path}: tensor {name} has type {t.type.name}; LoRA tensors must be "
                                  + ", ".join(schema.LORA_TENSOR_TYPES))
            if len(t.shape) != 2:
                raise FormatError(f"{path}: tensor {name} has shape {list(t.shape)}, expected a matrix")
            halves.setdefault((layer, module), {})[half] = t
        elif (m := _GATE_RE.match(name)) is not None:
            layer = int(m[1])
            if layer >= n_layer:
                raise FormatError(f"{path}: tensor {name}: layer {layer} >= n_layer {n_layer}")
            gates.setdefault(layer, {})[m[2]] = t
        else:
            raise FormatError(f"{path}: unexpected tensor {name} in a LoRA-Flow file")
    for layer in range(n_layer):
        for part, want in (("weight", [n_embd, k]), ("bias", [k])):
            name = (schema.TENSOR_GATE_WEIGHT if part == "weight" else schema.TENSOR_GATE_BIAS).format(bid=layer)
            t = gates.get(layer, {}).get(part)
            if t is None:
                raise FormatError(f"{path}: missing gate tensor {name}")
            if t.type.name != "F32" or list(t.shape) != want:
                raise FormatError(f"{path}: gate tensor {name} is {t.type.name} {list(t.shape)}, expected F32 {want}")
    if not halves:
        raise FormatError(f"{path}: no LoRA tensors (flow_a/flow_b pairs)")
    pairs = {}
    for (layer, module), hv in halves.items():
        for half in ("flow_a", "flow_b"):
            if half not in hv:
                raise FormatError(f"{path}: blk.{layer}.{module}: {half} missing (both halves of a pair must exist)")
        a, b = hv["flow_a"], hv["flow_b"]
        if a.shape[1] != R or b.shape[0] != R or a.shape[0] < 1 or b.shape[1] < 1:
            raise FormatError(f"{path}: blk.{layer}.{module}: flow_a is {list(a.shape)} and flow_b {list(b.shape)} "
                              f"(ggml order), expected [n_in, {R}] and [{R}, n_out] for R = sum of ranks {ranks}")
        # without the base model, the sizes every supported arch fixes: the modules reading the
        # residual stream take n_embd inputs, those writing it give n_embd outputs
        if module in _READS_RESIDUAL and a.shape[0] != n_embd or module in _WRITES_RESIDUAL and b.shape[1] != n_embd:
            half, got = ("flow_a", a) if module in _READS_RESIDUAL else ("flow_b", b)
            raise FormatError(f"{path}: blk.{layer}.{module}.{half} is {list(got.shape)} (ggml order), but "
                              f"{module} {'reads' if half == 'flow_a' else 'writes'} n_embd = {n_embd} values")
        pairs[(layer, module)] = (a, b)
    return FlowFile(h, arch, version, n_layer, n_embd, list(names), list(ranks),
                    [float(x) for x in arrays[schema.KEY_ADAPTER_ALPHAS]],
                    [float(x) for x in arrays[schema.KEY_ADAPTER_SCALES]], float(temperature), gate_input, pairs)
