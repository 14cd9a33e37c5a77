"""FlowLlama: a llama_cpp.Llama that carries a LoRA-Flow adapter.

Tokenisation, sampling, chat templates, streaming and the OpenAI-style API are
llama-cpp-python's; this class adds the flow adapter, the fusion mode and the gate
weights the runtime computed for every evaluated token.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from typing import List, Optional, Sequence

import numpy as np
import llama_cpp

from loraflow.errors import FormatError, LoraFlowError, NativeError
from loraflow.modes import Mode
from loraflow.runtime import _bindings as B
from loraflow.runtime import llama_api
from loraflow.runtime.adapter import FlowAdapter


def set_native_mode(ctx, mode: Mode, seq_id: Optional[int] = None) -> None:
    """Set a resolved fusion mode on a llama_context: the context's (every sequence without its
    own), or sequence `seq_id`'s."""
    buf = None if mode.weights is None else mode.weights.ravel()
    ptr = None if buf is None else buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    n = 0 if buf is None else buf.size
    rc = B.llama_flow_set_mode(ctx, mode.code, ptr, n) if seq_id is None else \
        B.llama_flow_set_seq_mode(ctx, seq_id, mode.code, ptr, n)
    if rc != 0:
        raise NativeError(f"the runtime refused mode '{mode}'" + ("" if seq_id is None else f" for sequence {seq_id}"))


def set_batch_invariant(ctx, on: bool) -> None:
    """Batch-invariant CPU kernels on a llama_context, or the fast ones (see FlowLlama)."""
    if B.llama_flow_set_batch_invariant(ctx, bool(on)) != 0 and on:
        raise NativeError("this context has no CPU backend: deterministic decoding needs one")


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

    `mode` is a Mode, or a mode's name with `static_weights` (see loraflow.modes). With
    `record_gates=True` the gate weights of every token evaluated in `dynamic` mode are kept;
    `gate_weights()` returns them as [n_tokens, n_layer, k]. `rpc_servers="host:port,..."` puts
    the layers on llama.cpp rpc-servers (all of them unless n_gpu_layers says fewer; tensor_split
    shares them out; loraflow.runtime.rpc). `deterministic=True`: batch-invariant CPU kernels
    (llama_flow_set_batch_invariant) on this context and the BatchEngines made on it, so a
    sequence decodes to the same numbers whatever else shares its batch.
    """

    def __init__(
        self,
        model_path: str,
        *,
        flow_path: Optional[str | os.PathLike] = None,
        mode: Mode | str = "dynamic",
        static_weights=None,
        record_gates: bool = False,
        rpc_servers=None,
        deterministic: bool = False,
        **kwargs,
    ):
        self.flow: Optional[FlowAdapter] = None
        self._mode = Mode("off", "off", None)
        self._record = False
        self._gate_log: List[np.ndarray] = []
        self._dependents = weakref.WeakSet()   # closed before the model: contexts made on it (BatchEngine)
        if kwargs.get("n_gpu_layers") is None:         # every layer on the rpc-servers, else none offloaded
            kwargs["n_gpu_layers"] = -1 if rpc_servers else 0
        if rpc_servers:
            from loraflow.runtime import rpc

            self._rpc_devices = rpc.devices(rpc_servers)   # kept alive as long as the model
            with rpc.model_devices(self._rpc_devices):
                super().__init__(model_path, **kwargs)
        else:
            super().__init__(model_path, **kwargs)
        llama_api.check(self)
        self.deterministic = bool(deterministic)
        set_batch_invariant(self.ctx, self.deterministic)
        if flow_path is not None:
            self.set_flow(flow_path, mode=mode, static_weights=static_weights)
        self.record_gates(record_gates)

    def close(self) -> None:
        if not hasattr(self, "_stack"):   # __init__ failed before llama_cpp.Llama's: nothing to close
            return
        for dependent in list(getattr(self, "_dependents", ())):
            dependent.close()
        if getattr(self, "flow", None) is not None:
            self._detach()
        super().close()

    def on_close(self, obj) -> None:
        """Close `obj` (something made on this model) before the model is freed."""
        self._dependents.add(obj)

    # adapter

    def set_flow(self, flow_path, mode: Mode | str = "dynamic", static_weights=None) -> None:
        """Load a flow GGUF for this model and set it on the context (replacing any other)."""
        adapter = FlowAdapter(self.model, flow_path)
        self._detach()
        err = ctypes.create_string_buffer(1024)
        if B.llama_flow_set_adapter(self.ctx, adapter.ptr, err, len(err)) != 0:
            adapter.free()
            raise FormatError(f"{adapter.path}: " + (err.value.decode(errors="replace")
                                                     or "llama_flow_set_adapter refused the adapter"))
        self.flow = adapter
        self._mode = self.resolve_mode("dynamic")
        self.set_mode(mode, static_weights)

    def _detach(self) -> None:
        if self.flow is not None:
            B.llama_flow_set_adapter(self.ctx, None, None, 0)
            self.flow.free()
            self.flow = None
            self._mode = Mode("off", "off", None)

    @property
    def adapter_names(self) -> List[str]:
        return list(self.flow.names) if self.flow else []

    @property
    def eog_tokens(self) -> List[int]:
        """The vocabulary's end-of-generation tokens (what `ignore_eos` masks), found once."""
        if not hasattr(self, "_eog_tokens"):
            vocab = llama_api.vocab_ptr(self.model)
            self._eog_tokens = [t for t in range(self.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        return self._eog_tokens

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends a generation (end of text, end of turn, ...)."""
        return bool(llama_cpp.llama_vocab_is_eog(llama_api.vocab_ptr(self.model), token))

    def token_text(self, token: int) -> str:
        return llama_api.token_text(self.model, token)

    def clear_kv(self) -> None:
        """Forget what the KV cache holds (and the tokens llama-cpp-python thinks it holds)."""
        self.reset()
        llama_api.clear_kv(self.ctx)

    # mode

    @property
    def mode(self) -> Mode:
        return self._mode

    def resolve_mode(self, mode: Optional[str], weights=None) -> Mode:
        """The Mode `mode` (a name) with `weights` means for this model's adapter (ModeError if
        none)."""
        flow = self.flow
        return Mode.resolve(mode, weights, names=flow.names if flow else (), n_layer=flow.n_layer if flow else 0)

    def set_mode(self, mode: Mode | str, weights=None) -> None:
        """A Mode, or `dynamic`, `static` (with weights: k, or [n_layer, k]), `average`,
        `single:<name>`, `off`.

        The KV cache holds states computed under the previous mode, so it is cleared."""
        if not isinstance(mode, Mode):
            mode = self.resolve_mode(mode, weights)
        elif weights is not None:
            raise LoraFlowError("set_mode: a Mode carries its own weights")
        if self.flow is None:
            if mode.kind != "off":
                raise LoraFlowError(f"mode '{mode}' needs a flow adapter; load one with flow_path=")
            return
        set_native_mode(self.ctx, mode)
        self._mode = mode
        self.clear_kv()

    # gate weights

    def record_gates(self, on: bool = True) -> None:
        """Start (or stop) keeping the gate weights of every evaluated token."""
        B.llama_flow_set_record(self.ctx, bool(on))
        self._record = bool(on)

    @property
    def recording(self) -> bool:
        return self._record

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

    def eval(self, tokens: Sequence[int]) -> None:
        """llama_cpp.Llama.eval, one decode of at most n_batch tokens at a time, keeping each
        decode's gate weights when recording (the runtime keeps only the last decode's)."""
        tokens = list(tokens)
        for i in range(0, len(tokens), self.n_batch):
            super().eval(tokens[i:i + self.n_batch])
            if self._record and self.flow is not None and self._mode.kind != "off":
                self._gate_log.append(recorded_gates(self.ctx, self.flow))

    # convenience

    def eval_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Evaluate `tokens` from an empty cache and return their logits [n_tokens, n_vocab]
        (needs logits_all=True)."""
        if not llama_api.logits_all(self):
            raise LoraFlowError("eval_logits needs FlowLlama(..., logits_all=True)")
        self.clear_kv()
        self.eval(list(tokens))
        return np.array(self.scores[: self.n_tokens], dtype=np.float32)
