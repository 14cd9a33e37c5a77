"""Shared test setup: where llama.cpp's source is, and the tiny models (built once per session).

Helpers for building models, LoRAs and gates live in tests/fixtures.py (`from fixtures import ...`).
"""

import os
from pathlib import Path

import pytest

from loraflow.llama_source import ENV_VAR, current_source_file

# Before `make install` has recorded the llama.cpp source, use the unpacked sdist if it is here.
_SDIST_LLAMA_CPP = Path("/tmp/dl/llama_cpp_python-0.3.36/vendor/llama.cpp")
if not os.environ.get(ENV_VAR) and not current_source_file().is_file() and _SDIST_LLAMA_CPP.is_dir():
    os.environ[ENV_VAR] = str(_SDIST_LLAMA_CPP)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """fixtures.TinyModels: tiny_models.get("llama") -> TinyModel(arch, hf_dir, gguf, n_layer, n_embd)."""
    from fixtures import TinyModels

    return TinyModels(tmp_path_factory.mktemp("tiny-models"))
