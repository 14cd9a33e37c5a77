"""loraflow.runtime: LoRA-Flow adapters in a patched llama.cpp, through llama-cpp-python.

Three layers, as llama-cpp-python has them: `_bindings` (ctypes mirror of llama-flow.h),
`adapter` (a loaded flow file's lifetime) and `flow_llama` (FlowLlama, a llama_cpp.Llama);
beside them `batch_engine` (BatchEngine: many requests in one batch, each in its own mode),
`server`, `trace`, `interactive` and the commands (`cli`).
"""

__all__ = ["FlowLlama", "FlowAdapter", "BatchEngine"]

_WHERE = {"FlowLlama": "loraflow.runtime.flow_llama", "FlowAdapter": "loraflow.runtime.adapter",
          "BatchEngine": "loraflow.runtime.batch_engine"}


def __getattr__(name):
    # loaded on first use: `loraflow --help` (and runtime/cli.py) must not need llama_cpp
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'loraflow.runtime' has no attribute {name!r}")
