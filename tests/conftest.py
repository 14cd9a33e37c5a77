"""Shared test setup: the tiny models, built once per session (llama.cpp's converter comes from
the source `make install` built, see loraflow/llama_source.py).

Helpers for building models, LoRAs and gates live in tests/fixtures.py (`from fixtures import ...`).
"""

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """fixtures.TinyModels: tiny_models.get("llama") -> TinyModel(arch, hf_dir, gguf, n_layer, n_embd)."""
    from fixtures import TinyModels

    return TinyModels(tmp_path_factory.mktemp("tiny-models"))
