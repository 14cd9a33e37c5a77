"""LoRA-Flow in PyTorch: the reference for parity tests and the model gates train on.

For decoder layer l and token t, x = the residual stream entering layer l:

    w_l(t) = softmax(W_l x / T) + b_l                          (FlowGate; bias added after the softmax)
    y      = W h + sum_i w_l,i(t) * s_i * B_i A_i h             (FlowLinear, every adapted module of layer l)

FlowLinear evaluates the k LoRAs as one low-rank pair, as the runtime does:
A_cat = [A_1; ...; A_k] ([R, n_in], R = sum r_i), B_cat = [s_1 B_1, ..., s_k B_k]
([n_out, R]) and y += B_cat (expand(w) * (A_cat h)), where expand repeats w_i over
adapter i's r_i rows. An adapter that does not cover a module has zero rows there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loraflow import schema
from loraflow.converter.gates import initial_bias, load_paper_tensors, read_digests
from loraflow.errors import FormatError, LoraFlowError
from loraflow.gate_training.quantized import QuantLinear
from loraflow.modes import Mode
from loraflow.peft_io import PeftAdapter, check_adapter_digests



class FlowGate(nn.Module):
    """One gate per decoder layer: w = softmax(W x / T) + b, with W = weight / input_scale.

    input_scale is 1 unless training sets it to the layer input's typical RMS
    (FlowModel.set_input_scales): the trained parameter `weight` then acts on inputs of unit
    scale, so one learning rate suits models whose residual streams differ by 100x (Adam moves
    each parameter by about lr a step, whatever its gradient's size). Checkpoints hold W itself
    (effective_weight), so the gate file, the converter and the runtime do not see the scale."""

    def __init__(self, n_embd: int, k: int, init_adapter: int, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(k, n_embd, dtype=dtype, device=device))
        # one-hot on init_adapter at the start (k=2, init 1 -> [-0.5, 0.5], the paper's start)
        self.bias = nn.Parameter(torch.from_numpy(initial_bias(k, init_adapter)).to(dtype=dtype, device=device))
        self.register_buffer("input_scale", torch.ones((), dtype=dtype, device=device), persistent=False)

    def effective_weight(self) -> torch.Tensor:
        """W, the matrix the gate applies to the layer input itself."""
        return self.weight / self.input_scale

    def forward(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        logits = F.linear(x.to(self.weight.dtype), self.weight) / (self.input_scale * temperature)
        return torch.softmax(logits, dim=-1) + self.bias


class _LayerWeights:
    """The fusion weights of one layer for the current forward, shared by its FlowLinear modules."""

    w: torch.Tensor | None = None     # [batch, seq, k] (dynamic), [k] (static) or None (off)


class FlowLinear(nn.Module):
    """A frozen nn.Linear plus k LoRAs mixed by the layer's fusion weights."""

    def __init__(self, base: nn.Linear, loras: list[tuple[torch.Tensor, torch.Tensor] | None],
                 ranks: list[int], scales: list[float], fusion: _LayerWeights):
        super().__init__()
        self.base = base
        self.fusion = fusion
        a_rows, b_cols, slot = [], [], []
        for i, (lora, r, s) in enumerate(zip(loras, ranks, scales)):
            if lora is None:
                a, b = torch.zeros(r, base.in_features), torch.zeros(base.out_features, r)
            else:
                a, b = lora
            a_rows.append(a)
            b_cols.append(b * s)          # fold s_i into B_i
            slot += [i] * r
        # a QuantLinear (training over a GGUF's quantized blocks) computes in its dtype
        dev = (base.qweight if isinstance(base, QuantLinear) else base.weight).device
        dt = base.dtype if isinstance(base, QuantLinear) else base.weight.dtype
        self.register_buffer("a_cat", torch.cat(a_rows, 0).to(dev, dt), persistent=False)   # [R, n_in]
        self.register_buffer("b_cat", torch.cat(b_cols, 1).to(dev, dt), persistent=False)   # [n_out, R]
        self.register_buffer("slot", torch.tensor(slot, device=dev), persistent=False)      # [R] -> adapter i

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.base(h)
        w = self.fusion.w
        if w is None:
            return y
        # y += B_cat (expand(w) * (A_cat h))
        z = F.linear(h, self.a_cat) * w[..., self.slot]
        return y + F.linear(z, self.b_cat)


def _submodule(root: nn.Module, path: str, cls: type):
    """root's submodule at the dotted `path` if it is a `cls`, else None."""
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, cls) else None


def decoder_layers(hf_model: nn.Module, adapters: list[PeftAdapter]) -> nn.ModuleList:
    """The decoder layer list the adapters' parameter names point at (model.layers, transformer.h,
    model.language_model.layers, ...), looked up in the model as PEFT names it."""
    paths = {a.layers for a in adapters}
    if len(paths) != 1:
        raise LoraFlowError(f"the adapters adapt different layer lists: {sorted(paths)}")
    path = paths.pop()
    layers = _submodule(hf_model, path, nn.ModuleList)
    if layers is None:
        raise FormatError(f"the adapters adapt the layers {path}.N, which {type(hf_model).__name__} does not have "
                          "(LoRAs trained on another model?)")
    return layers


class FlowModel(nn.Module):
    """A transformers causal LM with k frozen LoRAs fused per token and layer by trainable gates.

    The LM is modified in place: its target nn.Linear modules become FlowLinear, all its
    parameters are frozen; only the gates (self.gates[l].weight, .bias) train.
    """

    def __init__(self, hf_model: nn.Module, adapters: list[PeftAdapter], names: list[str],
                 temperature: float = 1.0, init_adapter: int | None = None):
        super().__init__()
        k = len(adapters)
        if k == 0 or len(names) != k:
            raise LoraFlowError(f"need k >= 1 adapters and one name each, got {k} adapters and {len(names)} names")
        if len(set(names)) != k:
            raise LoraFlowError(f"adapter names must be unique, got {names}")
        init_adapter = k - 1 if init_adapter is None else init_adapter
        if not -k <= init_adapter < k:
            raise LoraFlowError(f"init_adapter={init_adapter} is not a slot of {k} adapters")
        self.model = hf_model
        self.names = list(names)
        # into the gate checkpoint, to tell the LoRAs apart at its next load (check_adapter_digests);
        # digests and paths only: the LoRAs' own arrays are copied into the FlowLinears and let go
        self.adapter_digests = [a.digest() for a in adapters]
        self.adapter_paths = [a.path for a in adapters]
        self.k = k
        self.temperature = float(temperature)
        layers = decoder_layers(hf_model, adapters)
        self.n_layer = len(layers)
        self.n_embd = hf_model.config.get_text_config().hidden_size
        ref = next(hf_model.parameters())
        self.gates = nn.ModuleList(
            FlowGate(self.n_embd, k, init_adapter % k, dtype=ref.dtype, device=next(layer.parameters()).device)
            for layer in layers)
        self._layer_weights = [_LayerWeights() for _ in layers]
        self._wrap_linears(layers, adapters, names)
        for p in hf_model.parameters():
            p.requires_grad_(False)
        self._hooks = [layer.register_forward_pre_hook(self._make_hook(l), with_kwargs=True)
                       for l, layer in enumerate(layers)]
        self._last: list[torch.Tensor | None] = [None] * self.n_layer
        self._probe, self._probe_mask = None, None
        self._last_shape = (0, 0)
        self.set_mode("dynamic")

    # -- construction ------------------------------------------------------------------------

    def _wrap_linears(self, layers, adapters, names):
        for adapter, name in zip(adapters, names):
            for layer, module in adapter.weights:
                if layer >= self.n_layer:
                    raise FormatError(f"adapter {name!r} ({adapter.path}) has LoRA on layer {layer} {module}, "
                                      f"but the model has {self.n_layer} layers")
        ranks = [a.r for a in adapters]
        scales = [a.scale for a in adapters]
        replace = []       # check every module first, so a refusal leaves hf_model untouched
        covered_modules = sorted({key for a in adapters for key in a.weights})
        for l, module in covered_modules:
            layer = layers[l]
            covered = [a.weights.get((l, module)) for a in adapters]
            who = [n for n, c in zip(names, covered) if c is not None]
            base = _submodule(layer, module, (nn.Linear, QuantLinear))
            if base is None:
                raise FormatError(f"adapters {who} have LoRA on layer {l} {module}, which layer {l} of "
                                  f"{type(self.model).__name__} does not have as a linear module")
            loras = []
            for name, c in zip(names, covered):
                if c is None:
                    loras.append(None)
                    continue
                a, b = c
                if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                    raise FormatError(
                        f"adapter {name!r}: layer {l} {module} lora_A {list(a.shape)} / lora_B {list(b.shape)} "
                        f"do not fit the base weight [{base.out_features}, {base.in_features}]")
                loras.append((torch.from_numpy(a), torch.from_numpy(b)))
            parent_name, _, attr = module.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            replace.append((parent, attr, FlowLinear(base, loras, ranks, scales, self._layer_weights[l])))
        for parent, attr, flow_linear in replace:
            setattr(parent, attr, flow_linear)

    def _make_hook(self, l: int):
        def hook(layer, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]      # residual stream entering layer l
            if self._probe is not None:                            # measure_input_scales
                self._probe[l].append(x.detach().float().pow(2).mean(-1).sqrt()[self._probe_mask.to(x.device)])
            if self.mode.kind == "off":
                w = None
            elif self.mode.kind == "dynamic":
                w = self.gates[l](x, self.temperature).to(x.dtype)   # [batch, seq, k]
            else:
                s = self._static                                   # [n_layer, k], or [k] for every layer
                w = (s if s.ndim == 1 else s[l]).to(x.device, x.dtype)   # [k]
            self._layer_weights[l].w = w
            self._last[l] = None if w is None else w.detach()
            self._last_shape = tuple(x.shape[:2])
        return hook

    # -- modes ---------------------------------------------------------------------------------

    def resolve_mode(self, mode, weights=None) -> Mode:
        """The Mode `mode` (a name) with `weights` means for these adapters (loraflow.modes)."""
        return Mode.resolve(mode, weights, names=self.names, n_layer=self.n_layer)

    def set_mode(self, mode: Mode | str, weights=None) -> None:
        """A Mode, or dynamic (the gates) | static (weights [k] or [n_layer, k]) | average |
        single:<name> | off."""
        if not isinstance(mode, Mode):
            mode = self.resolve_mode(mode, weights)
        self.mode = mode
        self._static = None if mode.weights is None else torch.from_numpy(mode.weights.copy())

    def learn_static(self, per_layer: bool = False) -> nn.Parameter:
        """Static mode with trainable weights: one weight per adapter ([k], shared by every layer)
        or per layer ([n_layer, k]), trained by gradient like the gates (the paper's task-level
        fusion baseline). They start where the gates start (W = 0): softmax(0) + b = 1/k + b."""
        start = torch.stack([g.bias.detach().float() + 1.0 / self.k for g in self.gates])   # [n_layer, k]
        weights = nn.Parameter((start if per_layer else start.mean(0)).clone())
        self.mode = Mode("static", "static", None)   # the weights are the parameter, not the Mode's
        # a plain attribute, not a registered parameter: set_mode puts a plain tensor here again
        object.__setattr__(self, "_static", weights)
        return weights

    # -- the scale of the gates' inputs -----------------------------------------------------------

    def measure_input_scales(self, batches) -> list[float]:
        """The typical RMS of the residual stream entering each layer: the median over the real
        (unpadded) tokens of `batches` ({input_ids, attention_mask} dicts) of each token's RMS, in
        the current mode. The median, not the RMS of all tokens: a few tokens (the first, in most
        models) carry activations 100x the others', and they would set the scale for all."""
        rms: list[list[torch.Tensor]] = [[] for _ in range(self.n_layer)]
        self._probe = rms
        try:
            with torch.no_grad():
                for batch in batches:
                    self._probe_mask = batch["attention_mask"].bool()
                    self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        finally:
            self._probe, self._probe_mask = None, None
        if not rms[0]:
            raise LoraFlowError("no batches to measure the layer inputs on")
        return [float(torch.cat(r).median()) for r in rms]

    def set_input_scales(self, scales) -> None:
        """Make gate l train on x / scales[l] (FlowGate.input_scale). The gates compute the same
        function before and after: `weight` is rescaled so that W stays as it was."""
        scales = [float(s) for s in scales]
        if len(scales) != self.n_layer:
            raise LoraFlowError(f"{len(scales)} input scales for a model of {self.n_layer} layers")
        for l, s in enumerate(scales):
            if not (math.isfinite(s) and s > 0):
                raise LoraFlowError(f"layer {l}: input scale {s} (the layer's input RMS) must be positive and finite")
        with torch.no_grad():
            for g, s in zip(self.gates, scales):
                g.weight.mul_(s / g.input_scale)
                g.input_scale.fill_(s)

    # -- running -------------------------------------------------------------------------------

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def last_gate_weights(self) -> np.ndarray:
        """[batch, n_tokens, n_layer, k] float32: the fusion weights the last forward used (0 for 'off')."""
        b, s = self._last_shape
        out = np.zeros((b, s, self.n_layer, self.k), dtype=np.float32)
        for l, w in enumerate(self._last):
            if w is not None:
                out[:, :, l, :] = w.float().expand(b, s, self.k).cpu().numpy()
        return out

    # -- gate checkpoints ----------------------------------------------------------------------

    def gate_state_dict(self) -> dict[str, torch.Tensor]:
        """Our checkpoint tensors (float32, CPU): layers.{i}.weight [k, n_embd], layers.{i}.bias [k]."""
        sd = {}
        for i, g in enumerate(self.gates):
            sd[schema.GATE_CKPT_WEIGHT.format(i=i)] = g.effective_weight().detach().float().cpu().contiguous()
            sd[schema.GATE_CKPT_BIAS.format(i=i)] = g.bias.detach().float().cpu().contiguous()
        return sd

    def save_gate(self, out_dir) -> Path:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / schema.GATE_CKPT_FILE
        from loraflow.converter.output import ordinary_mode

        save_file(self.gate_state_dict(), str(path), metadata={
            schema.GATE_CKPT_META_ADAPTERS: json.dumps(self.names),
            schema.GATE_CKPT_META_TEMPERATURE: repr(self.temperature),
            schema.GATE_CKPT_META_DIGESTS: json.dumps(self.adapter_digests),
        })
        ordinary_mode(path)                      # safetensors writes it 0600, unlike every other output
        return path

    def load_gate(self, path) -> None:
        """Load our checkpoint (a gate.safetensors file or the folder holding it); adopts its temperature."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / schema.GATE_CKPT_FILE
        if not path.is_file():
            raise FormatError(f"{path}: gate checkpoint not found")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        staged = self._check_gates(tensors, schema.GATE_CKPT_WEIGHT, schema.GATE_CKPT_BIAS, path)
        if schema.GATE_CKPT_META_ADAPTERS in meta:
            saved = json.loads(meta[schema.GATE_CKPT_META_ADAPTERS])
            if saved != self.names:
                raise FormatError(f"{path}: gates were trained for adapters {saved} (in that slot order), "
                                  f"this model has {self.names}")
        check_adapter_digests(read_digests(meta, path, self.k), self.adapter_digests, self.names, self.adapter_paths,
                              path)
        self._set_gates(staged)
        if schema.GATE_CKPT_META_TEMPERATURE in meta:
            self.temperature = float(meta[schema.GATE_CKPT_META_TEMPERATURE])

    def load_paper_gate(self, path) -> None:
        """Load a gate released with the paper (torch file); its slots are taken in this model's order."""
        path = Path(path)
        if not path.is_file():
            raise FormatError(f"{path}: paper gate file not found")
        tensors = {key: torch.from_numpy(v) for key, v in load_paper_tensors(path).items()}
        self._set_gates(self._check_gates(tensors, schema.PAPER_GATE_WEIGHT, schema.PAPER_GATE_BIAS, path))

    def _check_gates(self, tensors: dict, weight_fmt: str, bias_fmt: str, source) -> list:
        """Validate every layer's gate tensors (before any parameter changes); return [(W, b)] per layer."""
        k, n = self.k, self.n_embd
        staged = []
        for i in range(self.n_layer):
            wk, bk = weight_fmt.format(i=i), bias_fmt.format(i=i)
            for key in (wk, bk):
                if key not in tensors:
                    raise FormatError(f"{source}: missing layer {i}: no tensor {key} "
                                      f"(the model has {self.n_layer} layers)")
            w, b = tensors[wk], tensors[bk]
            if w.ndim != 2 or w.shape[0] != k:
                raise FormatError(f"{source}: {wk} has shape {list(w.shape)}: a gate for k={w.shape[0] if w.ndim else '?'} "
                                  f"adapters, but the model has k={k} ({self.names})")
            if w.shape[1] != n:
                raise FormatError(f"{source}: {wk} has shape {list(w.shape)}: n_embd={w.shape[1]}, "
                                  f"but the model's hidden size is {n}")
            if b.numel() != k:
                raise FormatError(f"{source}: {bk} has shape {list(b.shape)}, expected [{k}] for k={k} adapters")
            staged.append((w, b.reshape(k)))
        extra = weight_fmt.format(i=self.n_layer)
        if extra in tensors:
            raise FormatError(f"{source}: has a gate for layer {self.n_layer} ({extra}), "
                              f"but the model has only {self.n_layer} layers")
        return staged

    def _set_gates(self, staged: list) -> None:
        with torch.no_grad():
            for g, (w, b) in zip(self.gates, staged):
                g.weight.copy_(w.to(g.weight) * g.input_scale)     # W as given, in this gate's parametrization
                g.bias.copy_(b)
