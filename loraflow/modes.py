"""Fusion modes, shared by the runtime, the server and the PyTorch model.

    dynamic         the gate: w_l(t) = softmax(W_l x / T) + b_l
    static          fixed weights: k for every layer, or [n_layer, k]
    average         static, 1/k each
    single:<name>   static, one-hot on the named adapter
    off             the base model alone

A `Mode` is made once where the user's words come in (command-line options, an HTTP body, a
chat command) by `Mode.resolve`, which checks it against the adapter; from there it travels
unchanged to the native call (`llama_flow_set_seq_mode`) or to the PyTorch model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from loraflow.errors import LoraFlowError
from loraflow.schema import MODES

MODE_NAMES = ("dynamic", "static", "average", "single:<name>", "off")


class ModeError(LoraFlowError):
    """A mode or weights that cannot run; `field` is what the user got wrong: "mode" or
    "weights" (the CLI's --mode/--weights, HTTP's flow_mode/flow_weights)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class StaticWeights:
    """Static weights as the user gave them: [k] or [n_layer, k] float32, with the adapter names
    they were made for when a file says so (a static.json from train-gate)."""

    values: np.ndarray
    names: Optional[tuple] = None
    source: Optional[str] = None         # the file they came from


def parse_weights(value, files: bool = True) -> Optional[StaticWeights]:
    """Static weights from the user: numbers "0.3,0.7" (every layer) or "0.3,0.7;0.5,0.5;..." (a
    row of k per layer), a list (or list of rows) of numbers, or with `files` the path of a
    static.json written by train-gate. None stays None. ModeError(field "weights") otherwise."""
    if value is None:
        return None
    if isinstance(value, StaticWeights):
        return value
    if isinstance(value, (str, Path)):
        text = str(value).strip()
        path = Path(text)
        if files and (path.is_file() or text.endswith(".json") or "/" in text):
            return _read_static_json(path)
        try:
            rows = [[float(x) for x in row.split(",")] for row in text.strip(";").split(";")]
        except ValueError:
            raise ModeError(f"weights must be numbers separated by ',' (rows by ';')"
                            f"{' or a static.json file' if files else ''}, got {text!r}", "weights") from None
        if len(rows) > 1 and len({len(r) for r in rows}) != 1:
            raise ModeError(f"every row of weights needs the same number of values, got {text!r}", "weights")
        value = rows[0] if len(rows) == 1 else rows
    return StaticWeights(_as_array(value))


def _as_array(value) -> np.ndarray:
    try:
        w = np.array(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise ModeError("weights must be a list of numbers, or one list of k numbers per layer", "weights") from None
    if w.ndim not in (1, 2) or w.size == 0:
        raise ModeError(f"weights must be k numbers or one row of k per layer, got shape {w.shape}", "weights")
    if not np.all(np.isfinite(w)):
        raise ModeError("static weights must be finite numbers", "weights")
    w.setflags(write=False)
    return w


def _read_static_json(path: Path) -> StaticWeights:
    if not path.is_file():
        raise ModeError(f"{path}: no such static weights file", "weights")
    try:
        obj = json.loads(path.read_text())
        values = obj["weights"] if isinstance(obj, dict) else obj
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise ModeError(f"{path}: expected a static.json from train-gate ({{\"weights\": [...]}})", "weights") from None
    names = obj.get("adapters") if isinstance(obj, dict) else None
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ModeError(f"{path}: 'adapters' must be a list of adapter names", "weights")
    return StaticWeights(_as_array(values), None if names is None else tuple(names), str(path))


def mode_name(name: Optional[str], weights) -> str:
    """The mode a user means: the one named, else static when weights are given, else dynamic."""
    if name is not None:
        return name
    return "static" if weights is not None else "dynamic"


@dataclass(frozen=True, eq=False)
class Mode:
    """A fusion mode resolved against an adapter (its names and layer count)."""

    name: str                            # as the user said it: "dynamic", "static", "single:math", ...
    kind: str                            # what the graph computes: "off", "dynamic" or "static"
    weights: Optional[np.ndarray]        # [n_layer, k] float32, read-only, for kind "static"

    @property
    def code(self) -> int:
        """The integer llama_flow_set_mode takes (llama-flow.h's enum llama_flow_mode)."""
        return MODES[self.kind]

    @property
    def key(self) -> tuple:
        """Equal keys compute equal numbers (a KV cache made under one serves the other)."""
        return (self.kind, None if self.weights is None else self.weights.tobytes())

    def describe(self) -> str:
        """The mode as a person would type it: "static 0.3,0.7", "single:math", ..."""
        if self.name != "static":
            return self.name
        w = self.weights
        rows = w if (w != w[:1]).any() else w[:1]
        return "static " + ";".join(",".join(f"{x:g}" for x in row) for row in rows)

    def __str__(self) -> str:
        return self.name

    @classmethod
    def resolve(cls, name: Optional[str], weights=None, *, names: Sequence[str], n_layer: int) -> "Mode":
        """The mode `name` with `weights` (anything parse_weights takes) for an adapter with
        `names` and `n_layer` layers (no adapter: names empty). A name of None means "static" when
        weights are given, as HTTP's flow_weights alone does, else "dynamic"."""
        w = parse_weights(weights)
        name = mode_name(name, w)
        if not isinstance(name, str) or not name:
            raise ModeError("the mode must be a non-empty string", "mode")
        names = list(names)
        k = len(names)
        if not k and name != "off":
            raise ModeError(f"mode '{name}' needs a flow adapter, and none is loaded; only 'off' runs", "mode")
        if name in ("dynamic", "off"):
            if w is not None:
                raise ModeError(f"mode '{name}' takes no weights", "weights")
            return cls(name, name, None)
        if name == "average":
            table = np.full((n_layer, k), 1.0 / k, dtype=np.float32)
        elif name.startswith("single:"):
            adapter = name[len("single:"):]
            if adapter not in names:
                raise ModeError(f"mode '{name}': no adapter named '{adapter}' (adapters: {', '.join(names)})", "mode")
            table = np.zeros((n_layer, k), dtype=np.float32)
            table[:, names.index(adapter)] = 1.0
        elif name == "static":
            if w is None:
                raise ModeError(f"mode 'static' needs weights: {k} numbers, or {n_layer} x {k}", "weights")
            if w.names is not None and list(w.names) != names:
                raise ModeError(f"{w.source}: the weights are for adapters [{', '.join(w.names)}], this flow "
                                f"file's are [{', '.join(names)}] (names and order must match)", "weights")
            table = w.values
            if table.shape == (k,):
                table = np.tile(table, (n_layer, 1))
            if table.shape != (n_layer, k):
                raise ModeError(f"static weights must have shape ({k},) or ({n_layer}, {k}), got {w.values.shape}",
                                "weights")
        else:
            raise ModeError(f"unknown mode '{name}'; choose one of: {', '.join(MODE_NAMES)}", "mode")
        if name != "static" and w is not None:
            raise ModeError(f"mode '{name}' takes no weights", "weights")
        table = np.ascontiguousarray(table, dtype=np.float32)
        table.setflags(write=False)
        return cls(name, "static", table)
