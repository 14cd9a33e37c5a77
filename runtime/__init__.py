"""loraflow.runtime: LoRA-Flow adapters in a patched llama.cpp, through llama-cpp-python.

Three layers, as llama-cpp-python has them: `_bindings` (ctypes mirror of llama-flow.h),
`adapter` (a loaded flow file's lifetime) and `flow_llama` (FlowLlama, a llama_cpp.Llama).
"""

from loraflow.runtime.flow_llama import FlowLlama
from loraflow.runtime.adapter import FlowAdapter

__all__ = ["FlowLlama", "FlowAdapter"]
