"""Converters: PEFT adapters + gate -> LoRA-Flow GGUF (`convert_flow`); Hugging Face model -> GGUF (`convert_base`)."""

from loraflow.converter.base import convert_base
from loraflow.converter.flow import convert_flow

__all__ = ["convert_base", "convert_flow"]
