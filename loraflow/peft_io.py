"""Read a PEFT LoRA adapter folder into plain numpy arrays.

Shared by the converter and the PyTorch gate model. Plain LoRA on any linear module of
the decoder layers is accepted (which llama.cpp tensor it adapts is the converter's
business: converter/lora_layout.py); anything else (DoRA, per-module ranks, LoRA on
embeddings, lm_head or MoE experts, ...) is refused with a ConversionError that says what
is unsupported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loraflow.errors import ConversionError

logger = logging.getLogger("loraflow")

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# `<layer list>.<N>.<module path>.lora_<A|B>[.<adapter name>].weight`: the layer list is the
# decoder's ModuleList as PEFT names it (base_model.model.model.layers, ...transformer.h), the
# module path the module's name inside its layer (self_attn.q_proj, mlp.c_fc, ...).
_KEY_RE = re.compile(
    r"^(?P<layers>[A-Za-z_][\w.]*?)\.(?P<layer>\d+)\.(?P<module>[A-Za-z_]\w*(?:\.\w+)*?)"
    r"\.lora_(?P<ab>[AB])(?:\.(?P<name>[A-Za-z_][\w-]*))?\.weight$"
)
PEFT_PREFIX = "base_model.model."  # what PEFT puts before the model's own parameter names
# a numbered module inside a layer: one expert of a MoE block (mlp.experts.3.up_proj)
_EXPERT_RE = re.compile(r"(?:^|\.)experts\.\d+\.")


@dataclass
class PeftAdapter:
    """One LoRA: y = W h + scale * B A h on each covered (layer, module)."""

    r: int
    alpha: float
    use_rslora: bool
    scale: float                      # alpha / r, or alpha / sqrt(r) for rsLoRA
    target_modules: list[str]         # module paths inside a layer present in the weights, sorted
    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = field(repr=False)
    # (layer, module path, e.g. "self_attn.q_proj") -> (A [r, n_in] float32, B [n_out, r] float32)
    layers: str = "model.layers"      # the model's decoder layer list (its parameter names' prefix)
    name: str | None = None
    path: str | None = None

    @property
    def n_layers_covered(self) -> int:
        return len({layer for layer, _ in self.weights})

    def hf_weight_name(self, layer: int, module: str) -> str:
        """The base model's parameter this LoRA adapts, e.g. model.layers.3.self_attn.q_proj.weight."""
        return f"{self.layers}.{layer}.{module}.weight"

    def digest(self) -> str:
        """sha256 of what the LoRA computes: its scale and every A and B as float32, in (layer,
        module) order; the same however its file was saved. A gate checkpoint records one per
        slot, so a LoRA given under another adapter's name is caught (check_adapter_digests)."""
        h = hashlib.sha256(repr(float(self.scale)).encode())
        for layer, module in sorted(self.weights):
            h.update(f"{layer}.{module}".encode())
            for m in self.weights[layer, module]:
                h.update(np.ascontiguousarray(m, dtype=np.float32).tobytes())
        return h.hexdigest()


def check_adapter_digests(recorded: list[str] | None, given: list[str], names: list[str], paths: list,
                          source) -> None:
    """The LoRAs given for `names` (their digests `given`, read from `paths`) against the digests
    a gate checkpoint `source` recorded for those names at training: a LoRA that is another
    slot's (folders swapped under the right names) is refused, saying which is which; one the
    gate never saw is a warning (a LoRA retrained since), as a gate's fit to it is unknown, not wrong."""
    if recorded is None:        # a checkpoint from before the digests: nothing to compare
        return
    path_of = dict(zip(given, paths))
    for name, digest, path, trained in zip(names, given, paths, recorded):
        if digest == trained:
            continue
        if digest in recorded:
            right = ", ".join(f"{n}={path_of.get(d, '?')}" for n, d in zip(names, recorded))
            raise ConversionError(
                f"{source}: the LoRA given as {name!r} ({path}) is the one this gate was trained with "
                f"as {names[recorded.index(digest)]!r}: the adapter folders look swapped; the gate's slots are {right}")
        logger.warning("%s: the LoRA given as %r (%s) is not the one this gate was trained with for %r "
                       "(its weights differ): the gate has not seen it", source, name, path, name)


def read_peft_adapter(path, name: str | None = None) -> PeftAdapter:
    """Read a PEFT adapter folder (adapter_config.json + adapter_model.safetensors or .bin)."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: not a PEFT adapter folder (expected a directory with {CONFIG_FILE})")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise ConversionError(f"{path}: missing {CONFIG_FILE}; is this a PEFT adapter folder?")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_path}: not valid JSON ({e})") from None

    r, alpha, use_rslora = _check_config(cfg, cfg_path)
    tensors = _read_weights(path)
    weights, layers = _collect_lora(tensors, r, path)
    scale = alpha / math.sqrt(r) if use_rslora else alpha / r
    return PeftAdapter(
        r=r, alpha=alpha, use_rslora=use_rslora, scale=scale,
        target_modules=sorted({m for _, m in weights}),
        weights=weights, layers=layers, name=name, path=str(path),
    )


def _check_config(cfg: dict, cfg_path: Path) -> tuple[int, float, bool]:
    def refuse(what):
        raise ConversionError(f"{cfg_path}: {what} is not supported by LoRA-Flow (plain LoRA only)")

    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        refuse(f"peft_type {cfg.get('peft_type')!r}")
    if cfg.get("use_dora"):
        refuse("DoRA (use_dora=true)")
    if cfg.get("lora_bias"):
        refuse("a LoRA bias (lora_bias=true)")
    if cfg.get("modules_to_save"):
        refuse(f"modules_to_save {cfg['modules_to_save']} (fully trained modules)")
    if cfg.get("trainable_token_indices"):
        refuse("trainable_token_indices (trained embedding rows)")
    if cfg.get("layer_replication"):
        refuse("layer_replication")
    try:
        r = int(cfg["r"])
        alpha = float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise ConversionError(f"{cfg_path}: needs integer 'r' and number 'lora_alpha'") from None
    if r <= 0:
        raise ConversionError(f"{cfg_path}: r={r} must be positive")
    # Per-module ranks/alphas would need a scale per module; refuse unless they restate the defaults.
    for key, default in (("rank_pattern", r), ("alpha_pattern", alpha)):
        pattern = cfg.get(key) or {}
        varying = {k: v for k, v in pattern.items() if float(v) != float(default)}
        if varying:
            refuse(f"{key} with per-module values {varying} (global value {default})")
    return r, alpha, bool(cfg.get("use_rslora", False))


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    st, bin_ = (path / f for f in WEIGHT_FILES)
    if st.is_file():
        return _read_safetensors(st)
    if bin_.is_file():
        try:
            import torch
        except ImportError:
            raise ConversionError(f"{bin_}: reading a .bin adapter needs torch (pip install torch), "
                                  "or re-save the adapter with safe_serialization=True") from None
        state = torch.load(bin_, map_location="cpu", weights_only=True)
        return {k: v.detach().float().numpy() for k, v in state.items()}
    raise ConversionError(f"{path}: no adapter weights ({' or '.join(WEIGHT_FILES)})")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """safetensors.numpy, except for bf16, which numpy lacks: widen those by hand to float32."""
    from safetensors.numpy import load_file

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    if not any(t["dtype"] == "BF16" for t in header.values()):
        return load_file(str(path))
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for key, t in header.items():
        if t["dtype"] != "BF16":
            raise ConversionError(f"{path}: mixes BF16 with {t['dtype']} tensors ({key}); re-save it in one dtype")
        start, end = t["data_offsets"]
        bits = np.frombuffer(raw[start:end].tobytes(), dtype="<u2").astype(np.uint32) << 16
        out[key] = bits.view(np.float32).reshape(t["shape"])
    return out


def _collect_lora(tensors: dict[str, np.ndarray], r: int, path: Path):
    # name what is unsupported before complaining about any single unexpected tensor
    for key in tensors:
        if "lora_magnitude_vector" in key:
            raise ConversionError(f"{path}: tensor {key} is a DoRA magnitude; DoRA is not supported")
    only = "only LoRA on the linear modules of the decoder layers is supported"
    for key in tensors:
        if "lora_embedding" in key or "embed_tokens" in key:
            raise ConversionError(f"{path}: tensor {key} is LoRA on the token embeddings; {only}")
    for key in tensors:
        if "lm_head" in key:
            raise ConversionError(f"{path}: tensor {key} is LoRA on lm_head; {only}")
    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    layer_lists = set()
    for key, value in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise ConversionError(f"{path}: tensor {key} is not a decoder-layer lora_A/lora_B weight; {only}")
        module = m["module"]
        if _EXPERT_RE.search(module):
            raise ConversionError(f"{path}: tensor {key} is LoRA on one expert of a MoE layer; LoRA on MoE "
                                  f"experts is not supported ({only}, outside the experts)")
        layer_lists.add(m["layers"].removeprefix(PEFT_PREFIX))
        if value.ndim != 2:
            raise ConversionError(f"{path}: tensor {key} has shape {list(value.shape)}, expected 2-D")
        slot = halves.setdefault((int(m["layer"]), module), {})
        if m["ab"] in slot:
            raise ConversionError(f"{path}: two lora_{m['ab']} tensors for layer {m['layer']} {module} "
                                  "(several adapters in one file?)")
        slot[m["ab"]] = np.ascontiguousarray(value, dtype=np.float32)

    if not halves:
        raise ConversionError(f"{path}: no LoRA tensors found")
    if len(layer_lists) != 1:
        raise ConversionError(f"{path}: LoRA tensors in several layer lists {sorted(layer_lists)}")
    weights = {}
    for (layer, module), ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise ConversionError(f"{path}: layer {layer} {module} has no lora_{missing} tensor")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1] or a.shape[0] != r:
            raise ConversionError(f"{path}: layer {layer} {module}: lora_A {list(a.shape)} and lora_B "
                                  f"{list(b.shape)} do not share the configured rank r={r}")
        weights[(layer, module)] = (a, b)
    return weights, layer_lists.pop()
