"""Loading what training and evaluation start from: the base model (a Hugging Face folder, or a
GGUF file: dequantized by transformers, or with `quantized` its linear weights kept in their GGUF
blocks, gate_training/quantized.py), its tokenizer, and the FlowModel over k PEFT LoRAs."""

from __future__ import annotations

from pathlib import Path

from loraflow.errors import LoraFlowError

DTYPES = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(device: str = "auto") -> str:
    """auto: cuda if torch has a CUDA device, else mps (Apple GPUs) if it has that, else cpu."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if device not in DEVICES:
        raise LoraFlowError(f"device {device!r}: choose {', '.join(DEVICES[1:])} or auto")
    if device == "cuda" and not torch.cuda.is_available():
        raise LoraFlowError("device cuda: no CUDA device (or torch was built without CUDA)")
    if device == "mps" and not mps:
        raise LoraFlowError("device mps: no Apple GPU (or torch was built without MPS)")
    return device


def is_gguf(base) -> bool:
    path = Path(base)
    return path.is_file() and path.suffix.lower() == ".gguf"


def torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise LoraFlowError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]


def model_source(base) -> tuple[str, dict]:
    """(folder, from_pretrained kwargs) for a HF folder or a GGUF file."""
    path = Path(base)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraFlowError(f"{path}: not a Hugging Face model folder (no config.json)")
        return str(path), {}
    raise LoraFlowError(f"{base}: no such base model (expected a Hugging Face folder or a .gguf file)")


def load_tokenizer(base):
    from transformers import AutoTokenizer

    folder, kw = model_source(base)
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kw)
    except (OSError, ValueError) as e:
        raise LoraFlowError(f"{base}: cannot load its tokenizer ({e})") from None
    return tok


def load_model(base, dtype: str = "fp32", device: str = "cpu", quantized: bool = False):
    """The causal LM, frozen, in eval mode, on `device`. With `quantized` and a GGUF base, its
    linear weights and token embedding stay GGUF blocks, dequantized just in time."""
    from transformers import AutoModelForCausalLM

    if quantized and is_gguf(base):
        from loraflow.gate_training.quantized import load_quantized_model

        return load_quantized_model(base, torch_dtype(dtype)).to(device)
    folder, kw = model_source(base)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype), **kw)
    except (OSError, ValueError) as e:
        raise LoraFlowError(f"{base}: cannot load the model ({e})") from None
    return model.to(device).eval()


def load_flow_model(base, adapters, dtype: str = "fp32", device: str = "cpu", temperature: float = 1.0,
                    init_adapter: str | None = None, quantized: bool = False):
    """FlowModel over the base and `adapters` [(name, peft_dir), ...] (slot order). The gates are
    kept in float32 whatever the model's dtype (bf16 cannot hold a small update to a bias of 0.5).
    `quantized`: a GGUF base keeps its weights quantized (load_model)."""
    import torch

    from loraflow.gate_training.model import FlowModel
    from loraflow.peft_io import read_peft_adapter

    if not adapters:
        raise LoraFlowError("no adapters given (--adapter NAME=PEFT_DIR, one per LoRA)")
    names = [n for n, _ in adapters]
    init = None
    if init_adapter is not None:
        if init_adapter not in names:
            raise LoraFlowError(f"--init-adapter {init_adapter!r} is not one of the adapters ({', '.join(names)})")
        init = names.index(init_adapter)
    peft = [read_peft_adapter(p, n) for n, p in adapters]
    hf = load_model(base, dtype, device, quantized)
    flow = FlowModel(hf, peft, names, temperature=temperature, init_adapter=init)
    flow.gates.to(device=device, dtype=torch.float32)
    return flow


def dequantized_folder(gguf) -> Path:
    """A GGUF model saved as an ordinary Hugging Face folder (float32 safetensors + tokenizer), the
    weights dequantized by transformers; cached in $LORAFLOW_CACHE/hf, keyed by the file and the
    transformers version (PEFT training and `loraflow-convert base` need a folder, not a GGUF)."""
    import shutil
    import tempfile

    import torch
    import transformers

    from loraflow.models import cache_dir

    src = Path(gguf)
    stat = src.stat()
    key = f"{src.stem}-{stat.st_size}-{int(stat.st_mtime)}-tf{transformers.__version__}"
    root = cache_dir("hf")
    out = root / key
    if (out / "model.safetensors").is_file():
        return out
    loaded = load_model(src)
    # a model loaded from a GGUF carries a quantization_config and cannot be saved: copy its weights
    # into a fresh model built from the same config without it
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    fresh = type(loaded)(type(loaded.config).from_dict(config)).to(torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}."))
    fresh.save_pretrained(str(tmp))
    load_tokenizer(src).save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def parse_adapters(values) -> list[tuple[str, str]]:
    """["NAME=PEFT_DIR", ...] -> [(name, dir), ...]."""
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise LoraFlowError(f"--adapter {value!r}: expected NAME=PEFT_DIR")
        pairs.append((name, path))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise LoraFlowError(f"adapter names must be unique, got {names}")
    return pairs
