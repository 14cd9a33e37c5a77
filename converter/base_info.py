"""What the converter needs to know about a base model, read from a GGUF or a Hugging Face folder.

Only metadata is read: the llama.cpp architecture, the layer count, the hidden size, the
configuration llama.cpp's converter reads (config.json; for a GGUF, rebuilt from its metadata)
and the shape of every weight of the decoder layers.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from loraflow.errors import ConversionError, FormatError
from loraflow.gguf_read import read_header


@dataclass
class BaseInfo:
    arch: str          # llama.cpp architecture (general.architecture)
    n_layer: int
    n_embd: int
    # the Hugging Face configuration llama.cpp's converter reads (converter/lora_layout.py)
    hparams: dict = field(repr=False)
    # weight name -> (n_out, n_in) numpy order, of the decoder layers' matrices: GGUF names
    # (blk.N.attn_q.weight) for a GGUF base, Hugging Face names for a folder
    shapes: dict[str, tuple[int, ...]] = field(repr=False)
    is_gguf: bool = True
    path: str = ""


def read_base_info(path) -> BaseInfo:
    """A base model GGUF file or a Hugging Face model folder (config.json + safetensors)."""
    path = Path(path)
    if path.is_dir():
        return _read_hf(path)
    if path.is_file():
        return _read_gguf(path)
    raise ConversionError(f"{path}: base model not found (expected a GGUF file or a Hugging Face model folder)")


def check_decoder_arch(arch: str, path) -> str:
    """Refuse the llama.cpp architectures whose layers are not a transformer decoder stack, by the
    tensors gguf-py lists for them: recurrent and hybrid models carry state outside the residual
    stream (SSM, RWKV time/channel mix, short convolutions), encoder-decoders have two stacks."""
    import gguf

    try:
        tensors = gguf.MODEL_TENSORS[next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)]
    except StopIteration:
        raise ConversionError(f"{path}: architecture {arch!r} is unknown to this llama.cpp") from None
    kinds = {t.name.split("_")[0] for t in tensors}
    if kinds & {"SSM", "TIME", "CHANNEL", "SHORTCONV"}:
        raise ConversionError(f"{path}: architecture {arch!r} is recurrent or hybrid (state-space, RWKV or "
                              "convolution layers): LoRA-Flow supports decoder-only transformer stacks only")
    if {"ENC", "DEC"} <= kinds:
        raise ConversionError(f"{path}: architecture {arch!r} is an encoder-decoder: LoRA-Flow supports "
                              "decoder-only transformer stacks only")
    return arch


# ---- GGUF ----------------------------------------------------------------------------------
# loraflow.gguf_read reads the header without parsing the vocabulary (gguf.GGUFReader takes
# seconds on a 150k vocab); the converter needs only scalars and tensor shapes.

def read_gguf_header(path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(metadata, tensor shapes in ggml order) of a GGUF file; long arrays come back as None."""
    header = read_header(path)
    return header.meta, header.shapes


# GGUF metadata -> the config.json keys llama.cpp's converter classes read for the layout
_GGUF_TO_HF_CONFIG = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "context_length": "max_position_embeddings",
    "rope.freq_base": "rope_theta",
}


def _read_gguf(path: Path) -> BaseInfo:
    from loraflow.converter.lora_layout import representative_hf_architecture

    meta, shapes = read_gguf_header(path)
    gtype = meta.get("general.type", "model")
    if gtype != "model":
        raise ConversionError(f"{path}: general.type is {gtype!r}; --base must be a base model GGUF, not an {gtype}")
    arch = meta.get("general.architecture")
    if arch is None:
        raise FormatError(f"{path}: no general.architecture key")
    check_decoder_arch(arch, path)

    def get(name, required=True):
        key = f"{arch}.{name}"
        value = meta.get(key)
        if isinstance(value, list):  # per-layer values: only uniform ones are supported
            if len(set(value)) != 1:
                raise ConversionError(f"{path}: {key} varies per layer ({value}); not supported")
            value = value[0]
        if value is None and required:
            raise FormatError(f"{path}: missing key {key}")
        return value

    hf_arch = representative_hf_architecture(arch)
    if hf_arch is None:
        raise ConversionError(f"{path}: llama.cpp's converter makes no {arch!r} models from Hugging Face ones, so "
                              "it cannot say where their LoRAs go")
    hparams = {"architectures": [hf_arch]}
    for key, hf_key in _GGUF_TO_HF_CONFIG.items():
        if (value := get(key, required=False)) is not None:
            hparams[hf_key] = value
    hparams.setdefault("num_key_value_heads", hparams.get("num_attention_heads"))
    pattern = re.compile(r"^blk\.\d+\.\w+\.weight$")
    return BaseInfo(arch=arch, n_layer=int(get("block_count")), n_embd=int(get("embedding_length")), hparams=hparams,
                    shapes={name: tuple(int(x) for x in reversed(ne)) for name, ne in shapes.items()
                            if pattern.match(name) and len(ne) >= 2},
                    is_gguf=True, path=str(path))


# ---- Hugging Face folder ----------------------------------------------------------------------

def hf_gguf_arch(config: dict, path) -> str:
    """The llama.cpp architecture llama.cpp's converter makes of a Hugging Face config.json, checked
    to be a decoder stack; a ConversionError otherwise."""
    from loraflow.converter.lora_layout import converter_class, gguf_arch_name, hf_architecture

    return check_decoder_arch(gguf_arch_name(converter_class(hf_architecture(config, path), path)), path)


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
    arch = hf_gguf_arch(config, path)
    text = config.get("text_config") or config  # multimodal models keep the LM's sizes there
    def size(keys):  # the names llama.cpp's converter accepts for these sizes
        for key in keys:
            if key in text:
                return int(text[key])
        raise ConversionError(f"{path / 'config.json'}: missing {keys[0]}")

    n_layer = size(("num_hidden_layers", "n_layer", "num_layers", "n_layers"))
    n_embd = size(("hidden_size", "n_embd", "d_model"))
    pattern = re.compile(r"\.\d+\..*\.weight$")
    return BaseInfo(arch=arch, n_layer=n_layer, n_embd=n_embd, hparams=config,
                    shapes={name: shape for name, shape in _safetensors_shapes(path).items()
                            if pattern.search(name) and len(shape) >= 2},
                    is_gguf=False, path=str(path))
