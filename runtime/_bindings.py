"""ctypes mirror of runtime/native/src/llama-flow.h, bound on the libllama handle that
llama-cpp-python already loaded (the patched build exports these symbols)."""

from __future__ import annotations

import ctypes

from loraflow.errors import NativeError

try:
    from llama_cpp import llama_cpp as _llama
except ImportError as e:  # pragma: no cover - depends on the install
    raise NativeError(
        "llama_cpp is not installed; run `make install` (builds loraflow's patched llama-cpp-python)"
    ) from e

from loraflow.runtime.llama_api import library

llama_flow_adapter_p = ctypes.c_void_p
# the `mode` argument of llama_flow_set_mode / _set_seq_mode: loraflow.schema.MODES


def _bind(name: str, argtypes: list, restype):
    try:
        fn = getattr(library(), name)
    except AttributeError as e:
        raise NativeError(
            f"the loaded libllama has no `{name}`: this llama_cpp is not loraflow's patched build; "
            "run `make install` (or `python runtime/native/build.py`)"
        ) from e
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


llama_flow_adapter_init = _bind(
    "llama_flow_adapter_init",
    [_llama.llama_model_p_ctypes, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t],
    llama_flow_adapter_p,
)
llama_flow_adapter_free = _bind("llama_flow_adapter_free", [llama_flow_adapter_p], None)
llama_flow_adapter_n_adapters = _bind("llama_flow_adapter_n_adapters", [llama_flow_adapter_p], ctypes.c_int32)
llama_flow_adapter_n_layer = _bind("llama_flow_adapter_n_layer", [llama_flow_adapter_p], ctypes.c_int32)
llama_flow_adapter_n_bytes = _bind("llama_flow_adapter_n_bytes", [llama_flow_adapter_p], ctypes.c_uint64)
llama_flow_adapter_name = _bind("llama_flow_adapter_name", [llama_flow_adapter_p, ctypes.c_int32], ctypes.c_char_p)
llama_flow_set_adapter = _bind(
    "llama_flow_set_adapter",
    [_llama.llama_context_p_ctypes, llama_flow_adapter_p, ctypes.c_char_p, ctypes.c_size_t],
    ctypes.c_int32,
)
llama_flow_set_mode = _bind(
    "llama_flow_set_mode",
    [_llama.llama_context_p_ctypes, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_int32],
    ctypes.c_int32,
)
llama_flow_set_seq_mode = _bind(
    "llama_flow_set_seq_mode",
    [_llama.llama_context_p_ctypes, ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_int32],
    ctypes.c_int32,
)
llama_flow_clear_seq_mode = _bind("llama_flow_clear_seq_mode", [_llama.llama_context_p_ctypes, ctypes.c_int32], None)
llama_flow_set_record = _bind("llama_flow_set_record", [_llama.llama_context_p_ctypes, ctypes.c_bool], None)
llama_flow_set_batch_invariant = _bind(
    "llama_flow_set_batch_invariant", [_llama.llama_context_p_ctypes, ctypes.c_bool], ctypes.c_int32
)
llama_flow_n_recorded = _bind("llama_flow_n_recorded", [_llama.llama_context_p_ctypes], ctypes.c_int32)
llama_flow_get_gates = _bind(
    "llama_flow_get_gates", [_llama.llama_context_p_ctypes, ctypes.c_int32], ctypes.POINTER(ctypes.c_float)
)
