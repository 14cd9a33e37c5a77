"""Converters: Hugging Face model -> (quantized) GGUF (`convert_base`, `quantize_gguf`); PEFT adapters +
gate -> LoRA-Flow GGUF (`convert_flow`); a summary of any of these (`inspect_gguf`); one adapter of a
flow file -> stock llama.cpp LoRA (`export_lora`)."""

from loraflow.converter.base import convert_base, quantize_gguf
from loraflow.converter.export_lora import export_lora
from loraflow.converter.flow import convert_flow
from loraflow.converter.summary import format_summary, inspect_gguf

__all__ = ["convert_base", "convert_flow", "export_lora", "format_summary", "inspect_gguf", "quantize_gguf"]
