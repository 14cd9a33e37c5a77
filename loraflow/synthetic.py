"""Random-but-nontrivial LoRAs and gates for a base model, written as ordinary PEFT
adapter folders and gate checkpoints. Used by the demo, the real-model checks and the
benchmarks; numpy only, shapes read from the base GGUF."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, Sequence, Tuple

import numpy as np
from safetensors.numpy import save_file

from loraflow import schema

# the projections of a llama-family layer: llama.cpp tensor -> Hugging Face module path
LLAMA_MODULES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
LLAMA_TARGETS = tuple(path.rsplit(".", 1)[1] for path in LLAMA_MODULES.values())  # q_proj, ..., down_proj


def base_gguf_shapes(path: str | os.PathLike) -> Tuple[int, int, Dict[Tuple[int, str], Tuple[int, int]]]:
    """(n_layer, n_embd, {(layer, hf_module): (n_out, n_in)}) of a llama-family base model GGUF."""
    from loraflow.gguf_read import read_header  # the header only: no vocabulary parsing

    header = read_header(path)
    arch = header.meta[schema.KEY_GENERAL_ARCH]
    n_layer = int(header.meta[f"{arch}.block_count"])
    n_embd = int(header.meta[f"{arch}.embedding_length"])
    shapes = {}
    for name, shape in header.shapes.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in LLAMA_MODULES:
            n_in, n_out = int(shape[0]), int(shape[1])  # ggml order
            shapes[(int(parts[1]), LLAMA_MODULES[parts[2]].rsplit(".", 1)[1])] = (n_out, n_in)
    return n_layer, n_embd, shapes


def write_random_peft_adapter(out_dir: str | os.PathLike, shapes: Dict[Tuple[int, str], Tuple[int, int]],
                              r: int, alpha: float, seed: int, targets: Iterable[str] = LLAMA_TARGETS,
                              strength: float = 1.0) -> Path:
    """A PEFT LoRA folder with random A and B. `strength` ~ the relative size of the LoRA's
    output next to the base weight's for unit inputs (1.0: clearly visible, not destructive)."""
    rng = np.random.default_rng(seed)
    targets = list(targets)
    tensors = {}
    for (layer, module), (n_out, n_in) in sorted(shapes.items()):
        if module not in targets:
            continue
        path = next(p for p in LLAMA_MODULES.values() if p.endswith("." + module))
        prefix = f"base_model.model.model.layers.{layer}.{path}"
        a = rng.standard_normal((r, n_in)).astype(np.float32) / np.sqrt(n_in)
        b = rng.standard_normal((n_out, r)).astype(np.float32) * strength / np.sqrt(r) * (r / alpha) * 0.05
        tensors[f"{prefix}.lora_A.weight"] = a
        tensors[f"{prefix}.lora_B.weight"] = b
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
              "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def random_gate(n_layer: int, k: int, n_embd: int, seed: int, scale: float = 1.0,
                input_rms: Sequence[float] | None = None):
    """Per layer (W [k, n_embd], b [k]) whose softmax clearly varies from token to token.

    With `input_rms` (the RMS of each layer's input) the gate logits have a spread of about
    `scale`, like a trained gate's; without it, of about `scale` times that RMS."""
    rng = np.random.default_rng(seed)
    layers = []
    for il in range(n_layer):
        norm = np.sqrt(n_embd) * (input_rms[il] if input_rms is not None else 1.0)
        w = rng.standard_normal((k, n_embd)).astype(np.float32) * np.float32(scale / norm)
        b = rng.uniform(-0.5, 0.5, size=k).astype(np.float32)
        layers.append((w, b))
    return layers


def write_gate_checkpoint(path: str | os.PathLike, layers: Sequence[Tuple[np.ndarray, np.ndarray]],
                          names: Sequence[str], temperature: float = 1.0) -> Path:
    """Our gate checkpoint format (schema.GATE_CKPT_*), readable without torch."""
    tensors = {}
    for i, (w, b) in enumerate(layers):
        tensors[schema.GATE_CKPT_WEIGHT.format(i=i)] = np.ascontiguousarray(w, dtype=np.float32)
        tensors[schema.GATE_CKPT_BIAS.format(i=i)] = np.ascontiguousarray(b, dtype=np.float32)
    meta = {schema.GATE_CKPT_META_ADAPTERS: json.dumps(list(names)),
            schema.GATE_CKPT_META_TEMPERATURE: repr(float(temperature))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path
