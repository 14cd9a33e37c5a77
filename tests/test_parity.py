"""Parity: the patched llama.cpp runtime against the PyTorch model of the method.

A tiny random model of each of fixtures.PARITY_ARCHS (all of TINY_ARCHS unless
LORAFLOW_TEST_ARCHS names fewer; transformers, converted by llama.cpp's own converter), k = 2
and 3 LoRAs of unequal ranks: two on every linear module PEFT's "all-linear" picks (one of them
rsLoRA), a third on the first and last linear module of layer 1 only. F32 base and LoRAs, F32
KV cache, flash attention off. Every mode, a 64-token sequence evaluated in one batch and token
by token; `off` against stock llama.cpp, and `single:<name>` against stock llama.cpp with that
LoRA set through llama_set_adapters_lora. With LORAFLOW_TEST_GPU_LAYERS the runtime runs on a
GPU backend (make test-vulkan; parity_setup.tolerances)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fixtures import PARITY_ARCHS  # noqa: E402
from parity_setup import (DEVICE_SLACK, GPU_LAYERS, N_TOKENS, RUNTIME, TOL, MultiSeqContext,  # noqa: E402
                          arch_loras, batch_tolerance, build_flow, gate_tolerance, modes_for, rel_err,
                          runtime_token_by_token, tolerances, torch_logits)

from loraflow.llama_source import llama_cpp_source_dir  # noqa: E402


@pytest.fixture(scope="module", params=PARITY_ARCHS)
def arch_setup(request, tiny_models, tmp_path_factory):
    """Per arch: the base, the three PEFT LoRAs, and the tokens."""
    tm = tiny_models.get(request.param)
    return arch_loras(tm, tmp_path_factory.mktemp(f"parity-{tm.arch}"))


@pytest.fixture(scope="module", params=[2, 3])
def flow_setup(request, arch_setup):
    """k adapters: the flow file, the runtime with it loaded, and the PyTorch model."""
    setup = build_flow(arch_setup, request.param)
    yield setup
    setup["llm"].close()


def test_hf_folder_base_gives_the_same_file(arch_setup):
    """--base as the Hugging Face folder or as its GGUF: the same flow file, byte for byte."""
    from loraflow.converter.flow import convert_flow

    from fixtures import make_random_gate

    tm, work = arch_setup["tm"], arch_setup["work"]
    names = list(arch_setup["spec"])[:2]
    gate = make_random_gate(tm.n_layer, 2, tm.n_embd, work / "gate-base-kinds", names)
    adapters = [(n, arch_setup["loras"][n]) for n in names]
    from_gguf = convert_flow(tm.gguf, adapters, gate, work / "base-gguf.gguf", force=True)
    from_hf = convert_flow(tm.hf_dir, adapters, gate, work / "base-hf.gguf", force=True)
    assert from_gguf.read_bytes() == from_hf.read_bytes()


@pytest.mark.parametrize("mode_index", range(7))
def test_runtime_matches_torch(flow_setup, mode_index):
    modes = modes_for(flow_setup)
    if mode_index >= len(modes):
        pytest.skip(f"k={flow_setup['k']} has {len(modes)} modes")
    mode, weights = modes[mode_index]
    llm, model, tokens = flow_setup["llm"], flow_setup["model"], flow_setup["tokens"]
    llm.set_mode(mode, weights)
    model.set_mode(mode, weights)
    ref = torch_logits(model, tokens)
    batch = llm.eval_logits(tokens)
    one_by_one = runtime_token_by_token(llm, tokens)
    assert batch.shape == one_by_one.shape == ref.shape
    print(f"[parity] {flow_setup['arch']} k={flow_setup['k']} {mode} {weights}: batch {rel_err(batch, ref):.1e}, "
          f"token by token {rel_err(one_by_one, ref):.1e}")
    tol = tolerances(flow_setup)  # TOL on the CPU
    assert rel_err(batch, ref) < tol["batch"], f"{mode} {weights}: batch differs by {rel_err(batch, ref):.2e}"
    assert rel_err(one_by_one, ref) < tol["token"], \
        f"{mode} {weights}: token by token differs by {rel_err(one_by_one, ref):.2e}"


def test_every_mode_in_one_batch(flow_setup):
    """One sequence in each mode, all in one batch (the mode is data of the graph: no new graph,
    and llama.cpp splits the batch into ubatches that mix them): each sequence gets the logits it
    gets alone in its mode, and the recorded weights are its own (the gate's, or its fixed ones)."""
    llm, tokens = flow_setup["llm"], flow_setup["tokens"]
    modes = modes_for(flow_setup)
    seqs = [tokens[5 * i:] + tokens[:5 * i] for i in range(len(modes))]
    seqs = [s[:24] for s in seqs]
    alone = []
    for (mode, weights), seq in zip(modes, seqs):
        llm.set_mode(mode, weights)
        llm.clear_gate_log()
        alone.append((llm.eval_logits(seq), llm.gate_weights()))
    llm.set_mode("dynamic")
    multi = MultiSeqContext(llm, len(modes))
    try:
        for i, (mode, weights) in enumerate(modes):
            multi.set_seq_mode(i, mode, weights)
        logits, gates = multi.decode(seqs)
    finally:
        multi.close()
    bounds = np.cumsum([0] + [len(s) for s in seqs])
    # stock's LoRAs at the largest weight any of these modes gives each adapter (1 for single)
    fixed = [np.abs(np.atleast_2d(w)).max(axis=0) for m, w in modes if m == "static"]
    tol = batch_tolerance(llm, seqs, scales=[float(x) for x in np.maximum.reduce([np.ones(flow_setup["k"])] + fixed)])
    for i, ((mode, weights), (ref, ref_gates), got) in enumerate(zip(modes, alone, logits)):
        assert rel_err(got, ref) < tol, f"sequence {i} ({mode}) in the mixed batch: {rel_err(got, ref):.2e}"
        if mode != "off":  # FlowLlama records nothing in off mode
            assert np.abs(gates[bounds[i]:bounds[i + 1]] - ref_gates).max() < gate_tolerance(tol), f"sequence {i} ({mode})"


def test_modes_are_not_trivially_equal(flow_setup):
    """Each LoRA and the gate visibly change the logits, so the parity above means something."""
    llm, tokens = flow_setup["llm"], flow_setup["tokens"]
    results = {}
    for mode, weights in modes_for(flow_setup):
        llm.set_mode(mode, weights)
        results[f"{mode}{weights}"] = llm.eval_logits(tokens)
    keys = list(results)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert rel_err(results[a], results[b]) > 1e-2, f"{a} and {b} give the same logits"


def test_gate_weights_match_torch(flow_setup):
    llm, model, tokens = flow_setup["llm"], flow_setup["model"], flow_setup["tokens"]
    llm.set_mode("dynamic")
    model.set_mode("dynamic")
    torch_logits(model, tokens)
    ref = model.last_gate_weights()[0]
    llm.clear_gate_log()
    llm.eval_logits(tokens)
    batch = llm.gate_weights()
    llm.clear_gate_log()
    runtime_token_by_token(llm, tokens)
    one_by_one = llm.gate_weights()
    assert batch.shape == one_by_one.shape == ref.shape == (N_TOKENS, flow_setup["n_layer"], flow_setup["k"])
    assert ref.std(axis=0).mean() > 0.01, "the random gate should vary from token to token"
    # float32 round-off in the residual stream, amplified by gate logits of a few units over T:
    # the weights (O(1)) get the logits' relative bound, TOL on the CPU; on a GPU backend the gate
    # reads layer inputs that are off by the device's rounding, which that bound measures
    tol = tolerances(flow_setup)
    assert np.abs(batch - ref).max() < tol["batch"], f"batch weights differ by {np.abs(batch - ref).max():.2e}"
    assert np.abs(one_by_one - ref).max() < tol["token"], \
        f"token by token weights differ by {np.abs(one_by_one - ref).max():.2e}"


def test_off_matches_stock_llama_cpp(flow_setup, arch_setup):
    import llama_cpp

    llm, tokens = flow_setup["llm"], flow_setup["tokens"]
    llm.set_mode("off")
    ours = llm.eval_logits(tokens)
    stock = llama_cpp.Llama(str(arch_setup["tm"].gguf), **RUNTIME)
    stock.eval(tokens)
    ref = np.array(stock.scores[:N_TOKENS])
    stock.close()
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


def stock_lora_gguf(arch_setup, name):
    """The PEFT adapter converted by llama.cpp's own convert_lora_to_gguf.py."""
    out = arch_setup["work"] / f"stock-{name}.gguf"
    if not out.exists():
        script = llama_cpp_source_dir() / "convert_lora_to_gguf.py"
        subprocess.run([sys.executable, str(script), "--base", str(arch_setup["tm"].hf_dir), "--outtype", "f32",
                        "--outfile", str(out), str(arch_setup["loras"][name])], check=True, capture_output=True)
    return out


def test_single_matches_stock_lora(flow_setup, arch_setup):
    import llama_cpp

    llm, tokens = flow_setup["llm"], flow_setup["tokens"]
    for name in flow_setup["names"]:
        llm.set_mode(f"single:{name}")
        ours = llm.eval_logits(tokens)
        r, _, _, rslora, _ = arch_setup["spec"][name]
        # convert_lora_to_gguf.py ignores use_rslora (llama.cpp scales alpha/r); the adapter scale
        # sqrt(r) turns that into rsLoRA's alpha/sqrt(r)
        stock = llama_cpp.Llama(str(arch_setup["tm"].gguf), lora_path=str(stock_lora_gguf(arch_setup, name)),
                                lora_scale=float(np.sqrt(r)) if rslora else 1.0, **RUNTIME)
        stock.eval(tokens)
        ref = np.array(stock.scores[:N_TOKENS])
        stock.close()
        tol = TOL
        if GPU_LAYERS:
            # both carry the device's rounding, each its own (the flow graph does a LoRA's matmuls
            # on its concatenated A and B): ours may be off from PyTorch by DEVICE_SLACK times what
            # stock is, so from stock by the sum
            model = flow_setup["model"]
            model.set_mode(f"single:{name}")
            stock_err = rel_err(ref, torch_logits(model, tokens))
            tol = max(TOL, (1 + DEVICE_SLACK) * stock_err)
            print(f"[parity] {flow_setup['arch']} single:{name}: stock llama.cpp vs PyTorch {stock_err:.1e}, "
                  f"ours vs stock {rel_err(ours, ref):.1e} (bound {tol:.1e})")
        assert rel_err(ours, ref) < tol, f"single:{name} differs from stock llama.cpp by {rel_err(ours, ref):.2e}"


def test_f16_lora_tensors_token_by_token(flow_setup, arch_setup):
    """F16 LoRA tensors token by token: each LoRA B row is k * rank long (16 or 24 here), shorter
    than one SIMD step of ggml's F16 dot, which the patch vectorizes. Against the PyTorch model
    with the same LoRA values (A and s_i B rounded to F16, as the file holds them)."""
    from loraflow.converter.flow import convert_flow
    from loraflow.gate_training.model import FlowLinear
    from loraflow.runtime import FlowLlama

    names, tokens, model = flow_setup["names"], flow_setup["tokens"], flow_setup["model"]
    f16 = convert_flow(arch_setup["tm"].gguf, [(n, arch_setup["loras"][n]) for n in names], flow_setup["gate"],
                       arch_setup["work"] / f"flow{flow_setup['k']}-f16.gguf", outtype="f16")
    flow_linears = [m for m in model.modules() if isinstance(m, FlowLinear)]
    saved = [(m.a_cat, m.b_cat) for m in flow_linears]
    model.set_mode("dynamic")
    try:
        for m in flow_linears:
            m.a_cat, m.b_cat = m.a_cat.half().float(), m.b_cat.half().float()
        ref = torch_logits(model, tokens)
    finally:
        for m, (a, b) in zip(flow_linears, saved):
            m.a_cat, m.b_cat = a, b
    llm = FlowLlama(str(arch_setup["tm"].gguf), flow_path=str(f16), **RUNTIME)
    try:
        f16_run = runtime_token_by_token(llm, tokens)
    finally:
        llm.close()
    print(f"[parity] {flow_setup['arch']} k={flow_setup['k']} F16 LoRAs token by token: {rel_err(f16_run, ref):.1e} "
          "against torch with the same F16 values")
    assert rel_err(f16_run, ref) < TOL
