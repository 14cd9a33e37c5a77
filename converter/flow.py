"""PEFT LoRA adapters + a gate checkpoint -> one LoRA-Flow GGUF (docs/FORMAT.md).

Everything is read and checked against the base model first (arch, layer count, hidden
size, every LoRA shape, gate k); only then is a temporary file written in the output
folder and renamed into place, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np

from loraflow import schema
from loraflow.converter.base_info import BaseInfo, read_base_info
from loraflow.converter.gates import GateCheckpoint, read_gate
from loraflow.converter.output import atomic_output, check_output
from loraflow.errors import ConversionError
from loraflow.peft_io import PeftAdapter, read_peft_adapter

logger = logging.getLogger("loraflow.converter")

OUTTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}


def llama_qk_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's converter gives q_proj/k_proj for arch llama: per head, the two RoPE
    halves [x_0..x_{d/2-1}, y_0..y_{d/2-1}] become interleaved pairs [x_0, y_0, x_1, y_1, ...].
    new_rows = old_rows[perm]."""
    head_dim = n_rows // n_head
    half = head_dim // 2
    idx = np.arange(n_rows).reshape(n_head, 2, half)   # [head, which half, i]
    return idx.transpose(0, 2, 1).reshape(n_rows)      # [head, i, which half]


def convert_flow(base, adapters, gate, out, outtype: str = "f32", temperature: float | None = None,
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
            for (l, module), (a, b) in pairs.items():
                _add_lora_tensor(writer, schema.TENSOR_FLOW_A.format(bid=l, module=module), a, qtype)
                _add_lora_tensor(writer, schema.TENSOR_FLOW_B.format(bid=l, module=module), b, qtype)
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
    for lora in loras:
        for (l, hf_module), (a, b) in sorted(lora.weights.items()):
            module = schema.HF_TO_GGUF_MODULE[hf_module]
            tensor = schema.TENSOR_BASE_WEIGHT.format(bid=l, module=module)
            if l >= info.n_layer:
                raise ConversionError(f"adapter {lora.name!r} ({lora.path}): LoRA for layer {l} {hf_module}, "
                                      f"but the base model {info.path} has {info.n_layer} layers")
            if (l, module) not in info.shapes:
                raise ConversionError(f"adapter {lora.name!r} ({lora.path}): LoRA for {hf_module} of layer {l}, "
                                      f"but the base model {info.path} has no tensor {tensor}")
            n_out, n_in = info.shapes[(l, module)]
            if a.shape[1] != n_in or b.shape[0] != n_out:
                raise ConversionError(
                    f"adapter {lora.name!r} ({lora.path}): layer {l} {hf_module}: LoRA delta B@A has shape "
                    f"[{b.shape[0]}, {a.shape[1]}] (lora_A {list(a.shape)}, lora_B {list(b.shape)}), "
                    f"but the base tensor {tensor} is [{n_out}, {n_in}] (numpy order) in {info.path}")


def _check_finite(g: GateCheckpoint, pairs) -> None:
    for l, (w, b) in enumerate(zip(g.weights, g.biases)):
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise ConversionError(f"{g.path}: the gate of layer {l} holds NaN or infinite values")
    for (l, module), (a, b) in pairs.items():
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ConversionError(f"the LoRAs for {schema.TENSOR_BASE_WEIGHT.format(bid=l, module=module)} "
                                  "hold NaN or infinite values")


def build_flow_tensors(loras: list[PeftAdapter], info: BaseInfo) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """(layer, gguf module) -> (flow_a [R, n_in], flow_b [n_out, R]) float32, in layer/module order."""
    ranks = [lora.r for lora in loras]
    offsets = np.concatenate([[0], np.cumsum(ranks)])
    R = int(offsets[-1])
    order = {m: i for i, m in enumerate(schema.HF_TO_GGUF_MODULE)}
    covered = sorted({key for lora in loras for key in lora.weights}, key=lambda k: (k[0], order[k[1]]))
    pairs = {}
    for l, hf_module in covered:
        module = schema.HF_TO_GGUF_MODULE[hf_module]
        n_out, n_in = info.shapes[(l, module)]
        flow_a = np.zeros((R, n_in), dtype=np.float32)
        flow_b = np.zeros((n_out, R), dtype=np.float32)
        for i, lora in enumerate(loras):
            if (l, hf_module) in lora.weights:
                a, b = lora.weights[(l, hf_module)]
                flow_a[offsets[i]:offsets[i + 1]] = a
                flow_b[:, offsets[i]:offsets[i + 1]] = b * np.float32(lora.scale)
        # llama.cpp stores llama's q/k weights with rows permuted; the LoRA output rows must match
        if info.arch == "llama" and module in ("attn_q", "attn_k"):
            n_head = info.n_head if module == "attn_q" else info.n_head_kv
            flow_b = flow_b[llama_qk_permutation(n_out, n_head)]
        pairs[(l, module)] = (flow_a, np.ascontiguousarray(flow_b))
    return pairs


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


def _add_lora_tensor(w: gguf.GGUFWriter, name: str, data: np.ndarray, qtype) -> None:
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if data.shape[-1] % block == 0:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            return
        # as llama.cpp's converters do: rows that do not fill whole blocks stay F16
        logger.warning("%s: row length %d is not a multiple of %d, writing F16 instead of Q8_0",
                    name, data.shape[-1], block)
        qtype = gguf.GGMLQuantizationType.F16
    w.add_tensor(name, gguf.quants.quantize(data, qtype))
