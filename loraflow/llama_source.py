"""Where llama.cpp's source lives (its convert_hf_to_gguf.py, gguf-py and vocab files).

`make install` unpacks llama-cpp-python's source distribution to build the patched
library and records the vendored llama.cpp folder in $LORAFLOW_CACHE/native/current-source.
LORAFLOW_LLAMA_CPP_SRC overrides it (any llama.cpp checkout of the same version).
"""

from __future__ import annotations

import os
from pathlib import Path

from loraflow.errors import LoraFlowError

ENV_VAR = "LORAFLOW_LLAMA_CPP_SRC"
CONVERT_SCRIPT = "convert_hf_to_gguf.py"


def current_source_file() -> Path:
    root = Path(os.environ.get("LORAFLOW_CACHE", Path.home() / ".cache" / "loraflow"))
    return root / "native" / "current-source"


def llama_cpp_source_dir() -> Path:
    """The llama.cpp source folder, checked to hold convert_hf_to_gguf.py."""
    env = os.environ.get(ENV_VAR)
    if env:
        path, origin = Path(env).expanduser(), f"${ENV_VAR}"
    else:
        marker = current_source_file()
        if not marker.is_file():
            raise LoraFlowError(
                f"llama.cpp source not found: run `make install` (it records the source in {marker}), "
                f"or set {ENV_VAR} to a llama.cpp folder")
        path, origin = Path(marker.read_text().strip()), str(marker)
    if not (path / CONVERT_SCRIPT).is_file():
        raise LoraFlowError(f"{path} (from {origin}) is not a llama.cpp source folder: no {CONVERT_SCRIPT}; "
                            f"run `make install` again or fix {ENV_VAR}")
    return path
