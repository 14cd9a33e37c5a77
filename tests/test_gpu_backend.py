"""The flow graph on a GPU backend: what `make test-vulkan` (and runtime/native/cuda_check.sh)
add to the parity tests they rerun there (tests/test_parity.py and tests/test_batch_cache.py
with LORAFLOW_TEST_GPU_LAYERS set).

Runs only where the runtime was built with a GPU backend and told to use it
(LORAFLOW_TEST_GPU_LAYERS != 0): here llama.cpp's Vulkan backend on Mesa's software device
lavapipe (GGML_VK_VISIBLE_DEVICES=0), on an NVIDIA machine CUDA. Checks that llama.cpp puts
every layer and the flow tensors on the device, and that SmolLM2 Q4_1 with the compose flow
adapter decodes greedily as the CPU build does (LORAFLOW_CPU_PYTHON: the CPU venv's python)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from parity_setup import GPU_LAYERS, RUNTIME

pytestmark = pytest.mark.skipif(GPU_LAYERS == 0, reason="LORAFLOW_TEST_GPU_LAYERS is 0: the CPU run")

PROMPTS = ["Resuelve: Ana tiene 7 manzanas y compra 5 más. ¿Cuántas manzanas tiene?",
           "Resuelve: Un tren recorre 60 km por hora durante 3 horas. ¿Cuántos km recorre?",
           "Resuelve: Pedro reparte 24 caramelos entre 4 amigos. ¿Cuántos recibe cada uno?",
           "Resuelve: Lucía lee 12 páginas cada día durante 5 días. ¿Cuántas páginas lee?",
           "Resuelve: Un granjero tiene 45 gallinas y vende 17. ¿Cuántas le quedan?",
           "Resuelve: Marta compra 3 cajas con 8 lápices cada una. ¿Cuántos lápices tiene?"]
N_NEW = 24


def test_layers_and_flow_tensors_on_the_device(tiny_models, tmp_path, capfd):
    import llama_cpp

    from loraflow.runtime import FlowLlama
    from tiny_flow import build_tiny_flow

    assert llama_cpp.llama_supports_gpu_offload(), "this llama_cpp has no GPU backend"
    tm = tiny_models.get("llama")
    flow = build_tiny_flow(tm, tmp_path)
    capfd.readouterr()
    llm = FlowLlama(str(tm.gguf), flow_path=str(flow), **{**RUNTIME, "verbose": True})
    try:
        llm.eval_logits(llm.tokenize(b"hello there, general"))
    finally:
        llm.close()
    log = capfd.readouterr().err
    device = re.search(r"using device (\w+)", log)
    assert device, log[-3000:]
    device = device[1]
    m = re.search(r"offloaded (\d+)/(\d+) layers to GPU", log)
    assert m, log[-3000:]
    n_on, n_all = int(m[1]), int(m[2])
    if GPU_LAYERS < 0:
        assert n_on == n_all == tm.n_layer + 1  # the repeating layers and the output layer
    else:
        assert n_on == GPU_LAYERS < n_all
    flow_bufs = re.findall(r"(\S+) flow buffer size", log)  # the loader's line per buffer it allocates
    assert device in flow_bufs, log[-3000:]
    if GPU_LAYERS > 0:  # the layers left on the CPU keep their flow tensors there
        assert any(b.startswith("CPU") for b in flow_bufs), flow_bufs


def greedy(python, gpu_layers):
    """{mode: [prompt + greedy continuation token ids]} for the PROMPTS from a python of either
    build, in its own process: the compose flow adapter on SmolLM2 Q4_1, dynamic and off."""
    code = f"""
import json, numpy as np
from loraflow.runtime.demo import COMPOSE_FLOW
from loraflow.models import default_model_path
from loraflow.runtime import FlowLlama
llm = FlowLlama(str(default_model_path()), flow_path=str(COMPOSE_FLOW), n_ctx=256, n_threads=2,
                logits_all=True, n_gpu_layers={gpu_layers}, verbose=False)
out = {{}}
for mode in ("dynamic", "off"):
    llm.set_mode(mode)
    rows = []
    for p in {PROMPTS!r}:
        ids = llm.tokenize(p.encode())
        llm.reset()
        llm.eval(ids)
        for _ in range({N_NEW}):  # greedy, one token at a time on the KV cache
            ids.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(ids[-1:])
        rows.append(ids)
    out[mode] = rows
print(json.dumps(out))
"""
    res = subprocess.run([python, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "LORAFLOW_TEST_GPU_LAYERS": str(gpu_layers)})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def agreeing_tokens(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy runs share from the start."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.skipif(not os.environ.get("LORAFLOW_CPU_PYTHON"), reason="LORAFLOW_CPU_PYTHON: the CPU build's python")
def test_smollm2_greedy_agrees_with_the_cpu_build():
    """Greedy decoding on the device follows the CPU build's for as long with the flow adapter
    (dynamic) as the bare base does (off): the device's Q4_1 kernels round differently from the
    CPU's, so both drift sooner or later; the flow path must not make that sooner."""
    device = greedy(sys.executable, GPU_LAYERS)
    cpu = greedy(os.environ["LORAFLOW_CPU_PYTHON"], 0)
    n_prompt = [len(row) - N_NEW for row in cpu["off"]]
    shared = {mode: [agreeing_tokens(d, c) - n for d, c, n in zip(device[mode], cpu[mode], n_prompt)]
              for mode in ("dynamic", "off")}
    for mode, tokens in shared.items():
        print(f"[device] SmolLM2 Q4_1 {mode}: greedy tokens identical to the CPU build before the first "
              f"difference, per prompt: {tokens} of {N_NEW}")
    assert min(shared["dynamic"] + shared["off"]) >= 0  # the prompts themselves are the same tokens
    assert np.mean(shared["dynamic"]) >= np.mean(shared["off"]) - 2, shared
