"""Gate checkpoints for the converter, read into numpy without needing torch for our own format.

Ours (written by gate_training): safetensors `layers.{i}.weight` [k, n_embd], `layers.{i}.bias` [k],
metadata "adapters" (JSON list of names, slot order), "temperature" and "adapter_digests" (JSON
list, each slot's PeftAdapter.digest(), loraflow.peft_io.check_adapter_digests).
The paper's released gates: a torch file with `encoder.layers.{i}.lora_fusion_gate.weight` [k, n_embd]
and `encoder.layers.{i}.weight_bias` [1, k] (fp16 or fp32, under any prefix: the authors' sample
gate.pt names them `...model.layers.{i}...` and has no weight_bias at all); no names, no
temperature. torch is imported only for those.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loraflow import schema
from loraflow.errors import FormatError

logger = logging.getLogger("loraflow.converter")


@dataclass
class GateCheckpoint:
    weights: list[np.ndarray] = field(repr=False)  # per layer [k, n_embd] float32
    biases: list[np.ndarray] = field(repr=False)   # per layer [k] float32
    names: list[str] | None                          # slot order, when the checkpoint records it
    temperature: float | None
    path: str
    digests: list[str] | None = None                 # each slot's PeftAdapter.digest(), when recorded

    @property
    def n_layer(self) -> int:
        return len(self.weights)

    @property
    def k(self) -> int:
        return self.weights[0].shape[0]

    @property
    def n_embd(self) -> int:
        return self.weights[0].shape[1]


def read_gate(path) -> GateCheckpoint:
    """Our gate (a .safetensors file, or a folder holding gate.safetensors) or the paper's torch file."""
    path = Path(path)
    if path.is_dir():
        path = path / schema.GATE_CKPT_FILE
    if not path.is_file():
        raise FormatError(f"{path}: gate checkpoint not found")
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors starts with an 8-byte header length followed by '{'; torch files are zip or pickle
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        return read_our_gate(path)
    return read_paper_gate(path)


def read_our_gate(path) -> GateCheckpoint:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot read it as safetensors ({e})") from None
    names = None
    if schema.GATE_CKPT_META_ADAPTERS in meta:
        try:
            names = json.loads(meta[schema.GATE_CKPT_META_ADAPTERS])
        except json.JSONDecodeError:
            names = None
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise FormatError(f"{path}: metadata {schema.GATE_CKPT_META_ADAPTERS!r} is not a JSON list of names: "
                              f"{meta[schema.GATE_CKPT_META_ADAPTERS]!r}")
    temperature = None
    if schema.GATE_CKPT_META_TEMPERATURE in meta:
        try:
            temperature = float(meta[schema.GATE_CKPT_META_TEMPERATURE])
        except ValueError:
            raise FormatError(f"{path}: metadata {schema.GATE_CKPT_META_TEMPERATURE!r} is not a number: "
                              f"{meta[schema.GATE_CKPT_META_TEMPERATURE]!r}") from None
    weights, biases = _collect(tensors, schema.GATE_CKPT_WEIGHT, schema.GATE_CKPT_BIAS, path)
    if names is not None and len(names) != weights[0].shape[0]:
        raise FormatError(f"{path}: metadata names {len(names)} adapters {names}, "
                          f"but the gate weights are for k={weights[0].shape[0]}")
    return GateCheckpoint(weights, biases, names, temperature, str(path), read_digests(meta, path, weights[0].shape[0]))


def read_digests(meta: dict, path, k: int) -> list[str] | None:
    """The adapters' digests a gate checkpoint's metadata records (None for one written before them)."""
    if schema.GATE_CKPT_META_DIGESTS not in meta:
        return None
    try:
        digests = json.loads(meta[schema.GATE_CKPT_META_DIGESTS])
    except json.JSONDecodeError:
        digests = None
    if not (isinstance(digests, list) and len(digests) == k and all(isinstance(d, str) for d in digests)):
        raise FormatError(f"{path}: metadata {schema.GATE_CKPT_META_DIGESTS!r} is not a JSON list of {k} digests: "
                          f"{meta[schema.GATE_CKPT_META_DIGESTS]!r}")
    return digests


def read_paper_gate(path) -> GateCheckpoint:
    path = Path(path)
    weights, biases = _collect(load_paper_tensors(path), schema.PAPER_GATE_WEIGHT, schema.PAPER_GATE_BIAS, path)
    return GateCheckpoint(weights, biases, None, None, str(path))


def initial_bias(k: int, start: int | None = None) -> np.ndarray:
    """The reference's starting bias: with W = 0 the softmax gives 1/k each, and this bias turns
    that into one-hot on adapter `start` (default the last, the task LoRA): k = 2 gives
    [-0.5, 0.5], the paper's start at weights (0, 1)."""
    bias = np.full(k, -1.0 / k, dtype=np.float32)
    bias[k - 1 if start is None else start] += 1.0
    return bias


_PAPER_KEY_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(lora_fusion_gate\.weight|weight_bias)$")


def load_paper_tensors(path) -> dict:
    """The gate tensors of the paper's torch file, float32 numpy, keyed as schema.PAPER_GATE_*
    whatever prefix the file puts before `layers.{i}.`. A file without any weight_bias (the
    authors' sample gate.pt) gets initial_bias(k) for every layer, with a notice."""
    path = Path(path)
    try:
        import torch
    except ImportError:
        raise FormatError(f"{path}: reading the paper's torch gate file needs torch (pip install torch)") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types
        raise FormatError(f"{path}: cannot read it as a torch state dict ({e})") from None
    for wrapper in ("state_dict", "model", "module"):  # tolerate a wrapped state dict
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise FormatError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    out = {}
    for key, v in sd.items():
        m = _PAPER_KEY_RE.search(key) if isinstance(key, str) and torch.is_tensor(v) else None
        if m:
            fmt = schema.PAPER_GATE_WEIGHT if m[2] == "lora_fusion_gate.weight" else schema.PAPER_GATE_BIAS
            name = fmt.format(i=int(m[1]))
            if name in out:
                raise FormatError(f"{path}: two tensors for {name} (the second is {key})")
            out[name] = v.detach().float().numpy()
    has_bias = any(name.endswith("weight_bias") for name in out)
    weights = [v for name, v in out.items() if name.endswith("lora_fusion_gate.weight")]
    if weights and not has_bias:
        k = weights[0].shape[0] if weights[0].ndim == 2 else 0
        logger.warning("%s: no weight_bias in the gate file; using the reference's initial bias %s for every "
                       "layer (weights start at %s)", path, initial_bias(k).tolist(),
                       (initial_bias(k) + 1.0 / k).round(6).tolist())
        for name in list(out):
            if name.endswith("lora_fusion_gate.weight"):
                out[name.replace("lora_fusion_gate.weight", "weight_bias")] = initial_bias(k)
    return out


def _collect(tensors: dict, weight_fmt: str, bias_fmt: str, path: Path):
    """Per-layer (W [k, n_embd], b [k]) for layers 0..n-1; every layer must be there with one shape."""
    pattern = re.compile("^" + re.escape(weight_fmt).replace(re.escape("{i}"), r"(\d+)") + "$")
    layers = sorted(int(m[1]) for key in tensors if (m := pattern.match(key)))
    if not layers:
        raise FormatError(f"{path}: no gate tensors (expected {weight_fmt.format(i=0)}, ...)")
    weights, biases = [], []
    for i in range(layers[-1] + 1):
        wk, bk = weight_fmt.format(i=i), bias_fmt.format(i=i)
        for key in (wk, bk):
            if key not in tensors:
                raise FormatError(f"{path}: missing gate for layer {i}: no tensor {key}")
        w = np.ascontiguousarray(tensors[wk], dtype=np.float32)
        b = np.asarray(tensors[bk], dtype=np.float32)
        if w.ndim != 2:
            raise FormatError(f"{path}: {wk} has shape {list(w.shape)}, expected [k, n_embd]")
        if weights and w.shape != weights[0].shape:
            raise FormatError(f"{path}: {wk} has shape {list(w.shape)}, but layer 0's gate is {list(weights[0].shape)}")
        if b.size != w.shape[0] or (b.ndim == 2 and b.shape[0] != 1) or b.ndim > 2:
            raise FormatError(f"{path}: {bk} has shape {list(b.shape)}, expected [{w.shape[0]}] "
                              f"for k={w.shape[0]} adapters")
        weights.append(w)
        biases.append(np.ascontiguousarray(b.reshape(-1)))
    return weights, biases
