"""Fusion modes, shared by the runtime and the PyTorch model.

    dynamic         the gate: w_l(t) = softmax(W_l x / T) + b_l
    static          fixed weights: k for every layer, or [n_layer, k]
    average         static, 1/k each
    single:<name>   static, one-hot on the named adapter
    off             the base model alone
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

from loraflow.errors import LoraFlowError

MODE_NAMES = ("dynamic", "static", "average", "single:<name>", "off")


class Mode(NamedTuple):
    kind: str                            # "off", "dynamic" or "static"
    weights: Optional[np.ndarray]        # [n_layer, k] float32 for "static", else None


def resolve_mode(mode: str, names: Sequence[str], n_layer: int, weights=None) -> Mode:
    """Turn a user's mode (and static weights) into what the runtime and the model run."""
    k = len(names)
    if mode in ("dynamic", "off"):
        if weights is not None:
            raise LoraFlowError(f"mode '{mode}' takes no weights")
        return Mode(mode, None)
    if mode == "average":
        w = np.full((n_layer, k), 1.0 / k, dtype=np.float32)
    elif mode.startswith("single:"):
        name = mode[len("single:"):]
        if name not in names:
            raise LoraFlowError(f"mode '{mode}': no adapter named '{name}' (adapters: {', '.join(names)})")
        w = np.zeros((n_layer, k), dtype=np.float32)
        w[:, list(names).index(name)] = 1.0
    elif mode == "static":
        if weights is None:
            raise LoraFlowError(f"mode 'static' needs weights: {k} numbers, or {n_layer} x {k}")
        w = np.asarray(weights, dtype=np.float32)
        if w.shape == (k,):
            w = np.tile(w, (n_layer, 1))
        if w.shape != (n_layer, k):
            raise LoraFlowError(f"static weights must have shape ({k},) or ({n_layer}, {k}), got {w.shape}")
        if not np.all(np.isfinite(w)):
            raise LoraFlowError("static weights must be finite numbers")
    else:
        raise LoraFlowError(f"unknown mode '{mode}'; choose one of: {', '.join(MODE_NAMES)}")
    if mode != "static" and weights is not None:
        raise LoraFlowError(f"mode '{mode}' takes no weights")
    return Mode("static", np.ascontiguousarray(w))
