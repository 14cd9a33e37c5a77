"""The lifetime of a loaded flow adapter: load it for a model, free it once."""

from __future__ import annotations

import ctypes
import logging
import os

from loraflow import schema
from loraflow.digest import check_digest as _check_digest
from loraflow.errors import FormatError
from loraflow.runtime import _bindings as B

logger = logging.getLogger("loraflow.runtime")
_NO_DIGEST_NOTED: set[str] = set()  # files without a digest, named once per process


class FlowAdapter:
    """A LoRA-Flow GGUF loaded for one llama.cpp model (`llama_model *`).

    The C++ loader validates the file against the model (FORMAT.md's rules: a broken file gets
    its precise message); then its digest (`loraflow.digest`) is checked in Python, streaming the
    file through a memory map, and a mismatch frees the adapter and raises a FormatError: a byte
    that changed where the rules cannot see it (a weight, an alpha, a name) is refused too. A file
    written before digests existed loads with a one-line notice, once per file and process.
    `check_digest=False` is the C++ loader alone (the bad-file corpus uses it to show what only
    the digest catches)."""

    def __init__(self, model_ptr, path: str | os.PathLike, check_digest: bool = True):
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
        self.digest = None
        if check_digest:
            try:
                self.digest = _check_digest(self.path)
            except BaseException:
                B.llama_flow_adapter_free(ptr)
                raise
            if self.digest is None:
                _note_no_digest(self.path)
        self.ptr = ptr

    def free(self) -> None:
        if self.ptr:
            B.llama_flow_adapter_free(self.ptr)
            self.ptr = None

    def __repr__(self) -> str:
        return f"FlowAdapter({self.path!r}, adapters={self.names}, n_layer={self.n_layer})"


def _note_no_digest(path: str) -> None:
    """A notice, not an error: the file predates digests, so a corrupted copy cannot be told from
    the original. Once per file per process (a server or an evaluation loads the same file many
    times); loraflow.digest.stamp_digest adds one without touching the tensor data."""
    key = os.path.realpath(path)
    if key not in _NO_DIGEST_NOTED:
        _NO_DIGEST_NOTED.add(key)
        logger.warning("%s: no %s (written before flow files carried one): loaded unchecked", path,
                       schema.KEY_DIGEST)
