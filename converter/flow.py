"""PEFT LoRA adapters + a gate checkpoint -> one LoRA-Flow GGUF (docs/FORMAT.md).

Everything is read and checked against the base model first (arch, layer count, hidden
size, every LoRA shape, gate k); only then is a temporary file written in the output
folder and renamed into place, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import gguf
import numpy as np

from loraflow import schema
from loraflow.converter.base_info import BaseInfo, read_base_info
from loraflow.converter.gates import GateCheckpoint, read_gate
from loraflow.converter.lora_layout import lora_layout
from loraflow.converter.output import atomic_output, check_output
from loraflow.digest import add_digest
from loraflow.errors import ConversionError
from loraflow.peft_io import PeftAdapter, check_adapter_digests, read_peft_adapter

logger = logging.getLogger("loraflow.converter")

OUTTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
# Q8_0: a quarter of F32's bytes and half of F16's, used by the runtime as stored (B too, when the
# ranks are equal), and at least as fast as F16 in every measured decode and prefill
# (docs/BENCHMARKS.md, "Real model sizes"); its error is the one llama.cpp's Q8_0 arithmetic
# brings anywhere (tests/test_quantized_flow.py). f32 keeps the PEFT values exactly.
DEFAULT_OUTTYPE = "q8_0"


def convert_flow(base, adapters, gate, out, outtype: str = DEFAULT_OUTTYPE, temperature: float | None = None,
                 force: bool = False) -> Path:
    """Write the flow GGUF `out` for `adapters` [(name, peft_dir), ...] (slot order) and `gate`."""
    out = Path(out)
    if outtype not in OUTTYPES:
        raise ConversionError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if not adapters:
        raise ConversionError("no adapters given")
    names = [str(name) for name, _ in adapters]
    for name in names:
        if not name or name != name.strip() or "=" in name:
            raise ConversionError(f"bad adapter name {name!r}: use a non-empty name without spaces around it or '='")
    if len(set(names)) != len(names):
        raise ConversionError(f"adapter names must be unique, got {names}")
    check_output(out, force, [base, gate] + [p for _, p in adapters])

    info = read_base_info(base)
    loras = [read_peft_adapter(path, name) for name, path in adapters]
    gate_ckpt = read_gate(gate)
    if temperature is None:
        temperature = gate_ckpt.temperature if gate_ckpt.temperature is not None else 1.0
    if not temperature > 0:
        raise ConversionError(f"temperature must be positive, got {temperature}")
    _check_gate(gate_ckpt, info, names)
    check_adapter_digests(gate_ckpt.digests, [a.digest() for a in loras], names, [a.path for a in loras],
                          gate_ckpt.path)
    _check_adapters(loras, info)

    pairs = build_flow_tensors(loras, info)
    _check_finite(gate_ckpt, pairs)
    qtype = OUTTYPES[outtype]

    with atomic_output(out, force) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=info.arch)
        try:
            _add_metadata(writer, info, loras, names, temperature)
            for l in range(info.n_layer):
                writer.add_tensor(schema.TENSOR_GATE_WEIGHT.format(bid=l), gate_ckpt.weights[l])
                writer.add_tensor(schema.TENSOR_GATE_BIAS.format(bid=l), gate_ckpt.biases[l])
            as_f16 = []                  # Q8_0 asked for, rows not whole blocks: F16, as llama.cpp does
            for (l, module), (a, b) in pairs.items():
                for template, data in ((schema.TENSOR_FLOW_A, a), (schema.TENSOR_FLOW_B, b)):
                    name = template.format(bid=l, module=module)
                    if not _add_lora_tensor(writer, name, data, qtype):
                        as_f16.append(name)
            if as_f16:
                logger.warning("%d of %d LoRA tensors have rows of a length that is not a multiple of %d "
                               "(e.g. %s, rank %d): written as F16 instead of Q8_0", len(as_f16), 2 * len(pairs),
                               gguf.GGML_QUANT_SIZES[qtype][0], as_f16[0], sum(x.r for x in loras))
            add_digest(writer)  # of the bytes about to be written, the last key
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    logger.info("wrote %s: %s, %d adapters %s, %d LoRA pairs, %s", out, info.arch, len(names), names,
                len(pairs), outtype)
    return out


def _check_gate(g: GateCheckpoint, info: BaseInfo, names: list[str]) -> None:
    if g.k != len(names):
        raise ConversionError(f"{g.path}: the gate is for k={g.k} adapters ({g.names or 'names not recorded'}), "
                              f"but {len(names)} adapters were given: {names}")
    if g.names is not None and g.names != names:
        raise ConversionError(f"{g.path}: the gate was trained for adapters {g.names} (in that slot order), "
                              f"but the adapters given are {names}")
    if g.n_embd != info.n_embd:
        raise ConversionError(f"{g.path}: the gate weights have shape [{g.k}, {g.n_embd}]: n_embd={g.n_embd}, "
                              f"but the base model {info.path} has n_embd={info.n_embd}")
    if g.n_layer != info.n_layer:
        missing = f"missing gate for layer {g.n_layer}" if g.n_layer < info.n_layer else "gates for extra layers"
        raise ConversionError(f"{g.path}: {missing}: the checkpoint has {g.n_layer} layers, "
                              f"the base model {info.path} has {info.n_layer}")


def _check_adapters(loras: list[PeftAdapter], info: BaseInfo) -> None:
    """Every LoRA against the weight it adapts: in Hugging Face names for a folder base (before
    llama.cpp's layout; build_flow_tensors checks the GGUF side)."""
    for lora in loras:
        for (l, module), (a, b) in sorted(lora.weights.items()):
            who = f"adapter {lora.name!r} ({lora.path}): layer {l} {module}"
            if l >= info.n_layer:
                raise ConversionError(f"{who}: LoRA for layer {l}, but the base model {info.path} has "
                                      f"{info.n_layer} layers")
            if info.is_gguf:
                continue
            name = lora.hf_weight_name(l, module)
            if name not in info.shapes:
                raise ConversionError(f"{who}: LoRA on {name}, but the base model {info.path} has no such weight")
            _check_delta(who, a, b, info.shapes[name], name, info.path)


def _check_delta(who, a, b, base_shape, base_name, where) -> None:
    if len(base_shape) != 2:
        raise ConversionError(f"{who}: the base weight {base_name} has shape {list(base_shape)}, not a matrix "
                              "(the experts of a MoE layer?): LoRA on MoE experts is not supported")
    if (b.shape[0], a.shape[1]) != tuple(base_shape):
        raise ConversionError(f"{who}: LoRA delta B@A has shape [{b.shape[0]}, {a.shape[1]}] (lora_A {list(a.shape)}, "
                              f"lora_B {list(b.shape)}), but the base tensor {base_name} is {list(base_shape)} "
                              f"(numpy order) in {where}")


def _check_finite(g: GateCheckpoint, pairs) -> None:
    for l, (w, b) in enumerate(zip(g.weights, g.biases)):
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise ConversionError(f"{g.path}: the gate of layer {l} holds NaN or infinite values")
    for (l, module), (a, b) in pairs.items():
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ConversionError(f"the LoRAs for {schema.TENSOR_BASE_WEIGHT.format(bid=l, module=module)} "
                                  "hold NaN or infinite values")


def build_flow_tensors(loras: list[PeftAdapter], info: BaseInfo) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """(layer, gguf module) -> (flow_a [R, n_in], flow_b [n_out, R]) float32, in layer order: each
    LoRA laid out as llama.cpp lays out the base (converter/lora_layout.py), then concatenated."""
    ranks = [lora.r for lora in loras]
    offsets = np.concatenate([[0], np.cumsum(ranks)])
    R = int(offsets[-1])
    layouts = [lora_layout(info.hparams, lora, info.path) for lora in loras]
    pairs = {}
    for name in sorted({n for layout in layouts for n in layout}, key=_tensor_order):
        placed = [(lora, layout[name]) for lora, layout in zip(loras, layouts) if name in layout]
        whos = [f"adapter {lora.name!r} ({lora.path}): LoRA on {hf_name} (llama.cpp's {name})"
                for lora, (_, _, hf_name) in placed]
        m = _BASE_WEIGHT_RE.match(name)
        if m is None:
            raise ConversionError(f"{whos[0]}: not a weight of a decoder layer")
        l, module = int(m[1]), m[2]
        if info.is_gguf:  # the base's shape; a folder's was checked by _check_adapters
            if name not in info.shapes:
                raise ConversionError(f"{whos[0]}: the base model {info.path} has no tensor {name} "
                                      "(a base of another architecture?)")
            base_shape, base_name = info.shapes[name], name
        else:  # the first adapter's, for the others to match
            a, b, _ = placed[0][1]
            base_shape, base_name = (b.shape[0], a.shape[1]), f"{name} as {placed[0][0].name!r} lays it out"
        for who, (_, (a, b, _)) in zip(whos, placed):
            _check_delta(who, a, b, base_shape, base_name, info.path)
        n_out, n_in = base_shape
        flow_a = np.zeros((R, n_in), dtype=np.float32)
        flow_b = np.zeros((n_out, R), dtype=np.float32)
        for i, (lora, layout) in enumerate(zip(loras, layouts)):
            if name in layout:
                a, b, _ = layout[name]
                flow_a[offsets[i]:offsets[i + 1]] = a
                flow_b[:, offsets[i]:offsets[i + 1]] = b * np.float32(lora.scale)
        pairs[(l, module)] = (flow_a, flow_b)
    return pairs


_BASE_WEIGHT_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def _tensor_order(name: str):
    m = _BASE_WEIGHT_RE.match(name)
    return (int(m[1]), name) if m else (-1, name)


def _add_metadata(w: gguf.GGUFWriter, info: BaseInfo, loras: list[PeftAdapter], names: list[str],
                  temperature: float) -> None:
    # general.architecture comes from GGUFWriter(arch=...)
    w.add_string(schema.KEY_GENERAL_TYPE, "adapter")
    w.add_string(schema.KEY_ADAPTER_TYPE, schema.ADAPTER_TYPE)
    w.add_uint32(schema.KEY_VERSION, schema.FORMAT_VERSION)
    w.add_uint32(schema.KEY_N_LAYER, info.n_layer)
    w.add_uint32(schema.KEY_N_EMBD, info.n_embd)
    w.add_uint32(schema.KEY_ADAPTER_COUNT, len(loras))
    V = gguf.GGUFValueType
    w.add_key_value(schema.KEY_ADAPTER_NAMES, names, V.ARRAY, sub_type=V.STRING)
    w.add_key_value(schema.KEY_ADAPTER_RANKS, [int(x.r) for x in loras], V.ARRAY, sub_type=V.UINT32)
    w.add_key_value(schema.KEY_ADAPTER_ALPHAS, [float(x.alpha) for x in loras], V.ARRAY, sub_type=V.FLOAT32)
    w.add_key_value(schema.KEY_ADAPTER_SCALES, [float(x.scale) for x in loras], V.ARRAY, sub_type=V.FLOAT32)
    w.add_float32(schema.KEY_GATE_TEMPERATURE, float(temperature))
    w.add_string(schema.KEY_GATE_INPUT, schema.GATE_INPUT)


def _add_lora_tensor(w: gguf.GGUFWriter, name: str, data: np.ndarray, qtype) -> bool:
    """Add one LoRA tensor in `qtype`; False when Q8_0 rows do not fill whole blocks and it went
    in as F16 instead (as llama.cpp's converters do)."""
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            return True
        w.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16))
        return False
    w.add_tensor(name, gguf.quants.quantize(data, qtype))
    return True
