"""The lifetime of a loaded flow adapter: load it for a model, free it once."""

from __future__ import annotations

import ctypes
import os

from loraflow.errors import FormatError
from loraflow.runtime import _bindings as B


class FlowAdapter:
    """A LoRA-Flow GGUF loaded for one llama.cpp model (`llama_model *`)."""

    def __init__(self, model_ptr, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FormatError(f"{self.path}: no such flow file")
        err = ctypes.create_string_buffer(1024)
        ptr = B.llama_flow_adapter_init(model_ptr, self.path.encode(), err, len(err))
        if not ptr:
            raise FormatError(err.value.decode(errors="replace") or f"{self.path}: could not load flow adapter")
        self.n_adapters = B.llama_flow_adapter_n_adapters(ptr)
        self.n_layer = B.llama_flow_adapter_n_layer(ptr)
        try:
            self.names = [B.llama_flow_adapter_name(ptr, i).decode() for i in range(self.n_adapters)]
        except UnicodeDecodeError:
            B.llama_flow_adapter_free(ptr)
            raise FormatError(f"{self.path}: an adapter name in 'loraflow.adapter.names' is not UTF-8") from None
        self.ptr = ptr

    def free(self) -> None:
        if self.ptr:
            B.llama_flow_adapter_free(self.ptr)
            self.ptr = None

    def __repr__(self) -> str:
        return f"FlowAdapter({self.path!r}, adapters={self.names}, n_layer={self.n_layer})"
