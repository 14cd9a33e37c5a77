"""FlowLlama: a llama_cpp.Llama that carries a LoRA-Flow adapter.

Tokenisation, sampling, chat templates, streaming and the OpenAI-style API are
llama-cpp-python's; this class adds the flow adapter, the fusion mode and the gate
weights the runtime computed for every evaluated token.
"""

from __future__ import annotations

import ctypes
import os
from typing import List, Optional, Sequence

import numpy as np
import llama_cpp

from loraflow.errors import FormatError, LoraFlowError, NativeError
from loraflow.modes import Mode, resolve_mode
from loraflow.runtime import _bindings as B
from loraflow.runtime.adapter import FlowAdapter

_MODE_CODES = {"off": B.LLAMA_FLOW_MODE_OFF, "dynamic": B.LLAMA_FLOW_MODE_DYNAMIC, "static": B.LLAMA_FLOW_MODE_STATIC}


def set_native_mode(ctx, flow: FlowAdapter, mode: str, weights=None, seq_id: Optional[int] = None) -> Mode:
    """Set a fusion mode on a llama_context: the context's (every sequence without its own), or
    sequence `seq_id`'s. Returns the resolved mode."""
    resolved = resolve_mode(mode, flow.names, flow.n_layer, weights)
    buf = None if resolved.weights is None else np.ascontiguousarray(resolved.weights, dtype=np.float32).ravel()
    ptr = None if buf is None else buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    n = 0 if buf is None else buf.size
    code = _MODE_CODES[resolved.kind]
    rc = B.llama_flow_set_mode(ctx, code, ptr, n) if seq_id is None else \
        B.llama_flow_set_seq_mode(ctx, seq_id, code, ptr, n)
    if rc != 0:
        raise NativeError(f"the runtime refused mode '{mode}'" + ("" if seq_id is None else f" for sequence {seq_id}"))
    return resolved


def recorded_gates(ctx, flow: FlowAdapter) -> np.ndarray:
    """The fusion weights the last llama_decode on `ctx` recorded: [n_tokens, n_layer, k], in
    batch order (the gate's for gated tokens, the fixed weights for the others)."""
    n_layer, k = flow.n_layer, flow.n_adapters
    n = B.llama_flow_n_recorded(ctx)
    out = np.empty((n, n_layer, k), dtype=np.float32)
    for il in range(n_layer):
        ptr = B.llama_flow_get_gates(ctx, il)
        if not ptr:
            raise NativeError(f"no gate weights recorded for layer {il}")
        out[:, il, :] = np.ctypeslib.as_array(ptr, shape=(n * k,)).reshape(n, k)
    return out


class FlowLlama(llama_cpp.Llama):
    """`FlowLlama(model_path, flow_path=..., mode="dynamic", record_gates=False, **llama_kwargs)`.

    With `record_gates=True` the gate weights of every token evaluated in `dynamic`
    mode are kept; `gate_weights()` returns them as [n_tokens, n_layer, k].
    """

    def __init__(
        self,
        model_path: str,
        *,
        flow_path: Optional[str | os.PathLike] = None,
        mode: str = "dynamic",
        static_weights=None,
        record_gates: bool = False,
        **kwargs,
    ):
        super().__init__(model_path, **kwargs)
        self.flow: Optional[FlowAdapter] = None
        self._mode = "off"
        self._static_weights: Optional[np.ndarray] = None
        self._record = False
        self._gate_log: List[np.ndarray] = []
        self._stack.callback(self._detach)  # runs before the context and the model are freed
        decode = self._ctx.decode

        def decode_and_record(batch):
            decode(batch)
            if self._record:
                self._collect_gates()

        self._ctx.decode = decode_and_record
        if flow_path is not None:
            self.set_flow(flow_path, mode=mode, static_weights=static_weights)
        self.record_gates(record_gates)

    # adapter

    def set_flow(self, flow_path, mode: str = "dynamic", static_weights=None) -> None:
        """Load a flow GGUF for this model and set it on the context (replacing any other)."""
        adapter = FlowAdapter(self._model.model, flow_path)
        self._detach()
        err = ctypes.create_string_buffer(1024)
        if B.llama_flow_set_adapter(self._ctx.ctx, adapter.ptr, err, len(err)) != 0:
            adapter.free()
            raise FormatError(f"{adapter.path}: " + (err.value.decode(errors="replace")
                                                     or "llama_flow_set_adapter refused the adapter"))
        self.flow = adapter
        self._mode = "dynamic"
        self.set_mode(mode, static_weights)

    def _detach(self) -> None:
        if self.flow is not None:
            B.llama_flow_set_adapter(self._ctx.ctx, None, None, 0)
            self.flow.free()
            self.flow = None
            self._mode = "off"

    @property
    def adapter_names(self) -> List[str]:
        return list(self.flow.names) if self.flow else []

    @property
    def eog_tokens(self) -> List[int]:
        """The vocabulary's end-of-generation tokens (what `ignore_eos` masks), found once."""
        if not hasattr(self, "_eog_tokens"):
            vocab = self._model.vocab
            self._eog_tokens = [t for t in range(self.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        return self._eog_tokens

    # mode

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str, weights=None) -> None:
        """`dynamic`, `static` (with weights: k, or [n_layer, k]), `average`, `single:<name>`, `off`.

        The KV cache holds states computed under the previous mode, so it is cleared."""
        if self.flow is None:
            if mode != "off":
                raise LoraFlowError(f"mode '{mode}' needs a flow adapter; load one with flow_path=")
            return
        resolved = set_native_mode(self._ctx.ctx, self.flow, mode, weights)
        self._mode = mode
        self._static_weights = resolved.weights
        self.reset()
        self._ctx.kv_cache_clear()

    # gate weights

    def record_gates(self, on: bool = True) -> None:
        """Start (or stop) keeping the gate weights of every evaluated token."""
        B.llama_flow_set_record(self._ctx.ctx, bool(on))
        self._record = bool(on)

    def clear_gate_log(self) -> None:
        self._gate_log.clear()

    def gate_weights(self) -> np.ndarray:
        """Gate weights of the tokens evaluated while recording: [n_tokens, n_layer, k].

        In static modes these are the static weights (the same for every token)."""
        k = self.flow.n_adapters if self.flow else 0
        n_layer = self.flow.n_layer if self.flow else 0
        if not self._gate_log:
            return np.zeros((0, n_layer, k), dtype=np.float32)
        return np.concatenate(self._gate_log, axis=0)

    def _collect_gates(self) -> None:
        if self.flow is None or self._mode == "off":
            return
        self._gate_log.append(recorded_gates(self._ctx.ctx, self.flow))

    # convenience

    def eval_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Evaluate `tokens` from an empty cache and return their logits [n_tokens, n_vocab]
        (needs logits_all=True)."""
        if not self._logits_all:
            raise LoraFlowError("eval_logits needs FlowLlama(..., logits_all=True)")
        self.reset()
        self._ctx.kv_cache_clear()
        self.eval(list(tokens))
        return np.array(self.scores[: self.n_tokens], dtype=np.float32)
