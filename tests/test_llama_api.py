"""loraflow's contact with llama-cpp-python (runtime/llama_api.py): the installed version is one
we support, everything we use of it is there, and a version without it fails with a message
that names what is missing and the version, not with an AttributeError deep in a request."""

from __future__ import annotations

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from loraflow.errors import NativeError  # noqa: E402
from loraflow.runtime import llama_api  # noqa: E402


def test_the_installed_version_is_supported():
    assert llama_cpp.__version__ in llama_api.SUPPORTED_VERSIONS, (
        f"llama-cpp-python {llama_cpp.__version__} is installed; runtime/llama_api.py supports "
        f"{llama_api.SUPPORTED_VERSIONS}: check every private attribute it reads, then add the version")


def test_everything_we_use_is_there(tiny_models):
    tm = tiny_models.get("llama")
    llm = llama_cpp.Llama(str(tm.gguf), n_ctx=256, verbose=False)
    try:
        llama_api.check(llm)
        assert llama_api.logits_all(llm) is False
        assert hasattr(llama_api.library(), "llama_flow_adapter_init"), "not loraflow's patched build"
        assert llama_api.token_text(llm.model, llm.token_eos())
    finally:
        llm.close()


def test_a_missing_attribute_is_named():
    class NotALlama:
        model = ctx = object()

    with pytest.raises(NativeError, match=rf"llama-cpp-python {llama_cpp.__version__} has no Llama._logits_all; "
                                          r"loraflow supports 0\.3\.36"):
        llama_api.check(NotALlama())
