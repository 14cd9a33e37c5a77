"""What the converter needs to know about a base model, read from a GGUF or a Hugging Face folder.

Only metadata is read: the architecture, the layer count, the hidden size, the head
counts (for the llama q/k row permutation) and the shape of every adapted projection.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from loraflow import schema
from loraflow.errors import ConversionError, FormatError
from loraflow.gguf_read import read_header

# Hugging Face model_type -> llama.cpp architecture
HF_MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}


@dataclass
class BaseInfo:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    # (layer, gguf module) -> (n_out, n_in), numpy order
    shapes: dict[tuple[int, str], tuple[int, int]] = field(repr=False)
    path: str = ""


def read_base_info(path) -> BaseInfo:
    """A base model GGUF file or a Hugging Face model folder (config.json + safetensors)."""
    path = Path(path)
    if path.is_dir():
        return _read_hf(path)
    if path.is_file():
        return _read_gguf(path)
    raise ConversionError(f"{path}: base model not found (expected a GGUF file or a Hugging Face model folder)")


def _check_arch(arch: str, path: Path, what: str) -> str:
    if arch not in schema.SUPPORTED_ARCHS:
        raise ConversionError(f"{path}: {what} {arch!r} is not supported; LoRA-Flow supports "
                              + ", ".join(schema.SUPPORTED_ARCHS))
    return arch


# ---- GGUF ----------------------------------------------------------------------------------
# loraflow.gguf_read reads the header without parsing the vocabulary (gguf.GGUFReader takes
# seconds on a 150k vocab); the converter needs only scalars and tensor shapes.

def read_gguf_header(path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(metadata, tensor shapes in ggml order) of a GGUF file; long arrays come back as None."""
    header = read_header(path)
    return header.meta, header.shapes


def _read_gguf(path: Path) -> BaseInfo:
    meta, shapes = read_gguf_header(path)
    gtype = meta.get("general.type", "model")
    if gtype != "model":
        raise ConversionError(f"{path}: general.type is {gtype!r}; --base must be a base model GGUF, not an {gtype}")
    arch = meta.get("general.architecture")
    if arch is None:
        raise FormatError(f"{path}: no general.architecture key")
    _check_arch(arch, path, "architecture")

    def get(name):
        key = f"{arch}.{name}"
        value = meta.get(key)
        if isinstance(value, list):  # per-layer values: only uniform ones are supported
            if len(set(value)) != 1:
                raise ConversionError(f"{path}: {key} varies per layer ({value}); not supported")
            value = value[0]
        if value is None:
            raise FormatError(f"{path}: missing key {key}")
        return int(value)

    n_head = get("attention.head_count")
    n_head_kv = get("attention.head_count_kv") if f"{arch}.attention.head_count_kv" in meta else n_head
    info = BaseInfo(arch=arch, n_layer=get("block_count"), n_embd=get("embedding_length"),
                    n_head=n_head, n_head_kv=n_head_kv, shapes={}, path=str(path))
    pattern = re.compile(r"^blk\.(\d+)\.(" + "|".join(schema.GGUF_MODULES) + r")\.weight$")
    for name, ne in shapes.items():
        m = pattern.match(name)
        if m and len(ne) == 2:
            info.shapes[(int(m[1]), m[2])] = (int(ne[1]), int(ne[0]))  # ggml [n_in, n_out] -> numpy
    return info


# ---- Hugging Face folder ----------------------------------------------------------------------

def hf_arch(config: dict, path) -> str:
    """llama.cpp architecture for a Hugging Face config.json, or a ConversionError."""
    model_type = config.get("model_type")
    arch = HF_MODEL_TYPES.get(model_type)
    if arch is None:
        raise ConversionError(f"{path}: model_type {model_type!r} is not supported; LoRA-Flow supports "
                              + ", ".join(schema.SUPPORTED_ARCHS)
                              + " (Hugging Face model_type " + ", ".join(HF_MODEL_TYPES) + ")")
    return arch


def read_hf_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{path}: no config.json; not a Hugging Face model folder")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_path}: not valid JSON ({e})") from None


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{path}: no *.safetensors weights")
    shapes = {}
    for file in files:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        shapes.update({k: tuple(v["shape"]) for k, v in header.items()})
    return shapes


def _read_hf(path: Path) -> BaseInfo:
    config = read_hf_config(path)
    arch = hf_arch(config, path)
    text = config.get("text_config") or config  # multimodal Gemma 3 keeps the LM's sizes there
    try:
        n_head = int(text["num_attention_heads"])
        info = BaseInfo(arch=arch, n_layer=int(text["num_hidden_layers"]), n_embd=int(text["hidden_size"]),
                        n_head=n_head, n_head_kv=int(text.get("num_key_value_heads") or n_head),
                        shapes={}, path=str(path))
    except KeyError as e:
        raise ConversionError(f"{path / 'config.json'}: missing {e.args[0]}") from None
    pattern = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(" + "|".join(schema.HF_TO_GGUF_MODULE)
                         + r")\.weight$")
    for name, shape in _safetensors_shapes(path).items():
        m = pattern.search(name)
        if m and len(shape) == 2 and "vision" not in name:
            info.shapes[(int(m[1]), schema.HF_TO_GGUF_MODULE[m[2]])] = (int(shape[0]), int(shape[1]))
    return info
