"""Errors loraflow raises for bad input; the CLI turns them into a message and exit code 1."""


class LoraFlowError(Exception):
    """Base class: a problem with what the user gave us, explained in the message."""


class FormatError(LoraFlowError):
    """A file that is not what it claims to be, or does not match the base model."""


class ConversionError(LoraFlowError):
    """Inputs that cannot be converted (unsupported adapter type, shape mismatch, ...)."""


class NativeError(LoraFlowError):
    """The patched llama.cpp library is missing or refused an operation."""
