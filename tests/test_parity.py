"""Parity: the patched llama.cpp runtime against the PyTorch model of the method.

Tiny random llama, qwen2, qwen3 and gemma3 models (transformers, converted by llama.cpp's own
converter), k = 2 and 3 LoRAs of unequal ranks (one rsLoRA, one covering only some modules and
layers), F32 base and LoRAs, F32 KV cache, flash attention off. Every mode, a 64-token
sequence evaluated in one batch and token by token; `off` against stock llama.cpp, and
`single:<name>` against stock llama.cpp with that LoRA set through llama_set_adapters_lora."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fixtures import TINY_ARCHS, make_random_gate, make_tiny_loras  # noqa: E402

from loraflow.converter.flow import convert_flow  # noqa: E402
from loraflow.llama_source import llama_cpp_source_dir  # noqa: E402
from loraflow.peft_io import read_peft_adapter  # noqa: E402

N_TOKENS = 64
TOL = 1e-3  # of the logits' scale
# name -> (rank, alpha, targets, rsLoRA, layers)
LORAS = {
    "lang": (4, 8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), False, None),
    "math": (8, 8, ("q_proj", "v_proj", "down_proj"), True, None),
    "code": (2, 4, ("o_proj", "up_proj"), False, [1]),
}
RUNTIME = dict(n_ctx=128, n_batch=N_TOKENS, n_ubatch=N_TOKENS, n_threads=2, logits_all=True, flash_attn=False,
               type_k=0, type_v=0, verbose=False)  # type 0 = F32 KV cache


@pytest.fixture(scope="module", params=TINY_ARCHS)
def arch_setup(request, tiny_models, tmp_path_factory):
    """Per arch: the base, the three PEFT LoRAs, their stock llama.cpp conversions, and the tokens."""
    tm = tiny_models.get(request.param)
    work = tmp_path_factory.mktemp(f"parity-{tm.arch}")
    loras = make_tiny_loras(tm.hf_dir, work, LORAS)
    rng = np.random.default_rng(0)
    import transformers

    vocab = transformers.AutoConfig.from_pretrained(str(tm.hf_dir)).vocab_size
    tokens = rng.integers(10, vocab, N_TOKENS).tolist()
    return dict(tm=tm, work=work, loras=loras, tokens=tokens)


@pytest.fixture(scope="module", params=[2, 3])
def flow_setup(request, arch_setup):
    """k adapters: the flow file, the runtime with it loaded, and the PyTorch model."""
    from transformers import AutoModelForCausalLM

    from loraflow.gate_training.model import FlowModel
    from loraflow.runtime import FlowLlama

    k = request.param
    tm, work = arch_setup["tm"], arch_setup["work"]
    names = list(LORAS)[:k]
    temperature = 1.0 if k == 2 else 0.7
    gate = make_random_gate(tm.n_layer, k, tm.n_embd, work / f"gate{k}", names, seed=k, temperature=temperature,
                            w_std=0.2)
    flow = convert_flow(tm.gguf, [(n, arch_setup["loras"][n]) for n in names], gate, work / f"flow{k}.gguf")
    llm = FlowLlama(str(tm.gguf), flow_path=str(flow), record_gates=True, **RUNTIME)
    hf = AutoModelForCausalLM.from_pretrained(str(tm.hf_dir), dtype=torch.float32)
    model = FlowModel(hf, [read_peft_adapter(arch_setup["loras"][n]) for n in names], names)
    model.load_gate(gate)
    yield dict(llm=llm, model=model, names=names, tokens=arch_setup["tokens"], k=k, n_layer=tm.n_layer, arch=tm.arch,
               gate=gate)
    llm.close()


def torch_logits(model, tokens):
    with torch.no_grad():
        return model.forward(torch.tensor([tokens])).logits[0].numpy()


def runtime_token_by_token(llm, tokens):
    llm.reset()
    llm._ctx.kv_cache_clear()
    for t in tokens:
        llm.eval([t])
    return np.array(llm.scores[: llm.n_tokens], dtype=np.float32)


def modes_for(setup):
    rng = np.random.default_rng(1)
    per_layer = rng.uniform(-0.5, 1.5, (setup["n_layer"], setup["k"])).round(3).tolist()
    return [("dynamic", None), ("static", per_layer), ("static", [0.7] + [0.4] * (setup["k"] - 1)),
            ("average", None), ("off", None)] + [(f"single:{n}", None) for n in setup["names"]]


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


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
    assert rel_err(batch, ref) < TOL, f"{mode} {weights}: batch differs by {rel_err(batch, ref):.2e}"
    assert rel_err(one_by_one, ref) < TOL, f"{mode} {weights}: token by token differs by {rel_err(one_by_one, ref):.2e}"


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
    # float32 round-off in the residual stream, amplified by gate logits of a few units over T
    assert np.abs(batch - ref).max() < 1e-3
    assert np.abs(one_by_one - ref).max() < 1e-3


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
        r, _, _, rslora, _ = LORAS[name]
        # convert_lora_to_gguf.py ignores use_rslora (llama.cpp scales alpha/r); the adapter scale
        # sqrt(r) turns that into rsLoRA's alpha/sqrt(r)
        stock = llama_cpp.Llama(str(arch_setup["tm"].gguf), lora_path=str(stock_lora_gguf(arch_setup, name)),
                                lora_scale=float(np.sqrt(r)) if rslora else 1.0, **RUNTIME)
        stock.eval(tokens)
        ref = np.array(stock.scores[:N_TOKENS])
        stock.close()
        assert rel_err(ours, ref) < TOL, f"single:{name} differs from stock llama.cpp by {rel_err(ours, ref):.2e}"


def test_f16_lora_tensors_token_by_token(flow_setup, arch_setup):
    """F16 LoRA tensors (the converter's default) token by token: each LoRA B row is k * rank
    long (16 or 24 here), shorter than one SIMD step of ggml's F16 dot, which the patch
    vectorizes; against the PyTorch model and against the F32 file."""
    from loraflow.converter.flow import convert_flow
    from loraflow.runtime import FlowLlama

    names, tokens, model = flow_setup["names"], flow_setup["tokens"], flow_setup["model"]
    f16 = convert_flow(arch_setup["tm"].gguf, [(n, arch_setup["loras"][n]) for n in names], flow_setup["gate"],
                       arch_setup["work"] / f"flow{flow_setup['k']}-f16.gguf", outtype="f16")
    model.set_mode("dynamic")
    ref = torch_logits(model, tokens)
    flow_setup["llm"].set_mode("dynamic")
    f32_run = runtime_token_by_token(flow_setup["llm"], tokens)
    llm = FlowLlama(str(arch_setup["tm"].gguf), flow_path=str(f16), **RUNTIME)
    try:
        f16_run = runtime_token_by_token(llm, tokens)
    finally:
        llm.close()
    print(f"[parity] {flow_setup['arch']} k={flow_setup['k']} F16 LoRAs token by token: {rel_err(f16_run, ref):.1e} "
          f"against torch, {rel_err(f16_run, f32_run):.1e} against the F32 file")
    assert rel_err(f16_run, ref) < TOL
    assert rel_err(f16_run, f32_run) < TOL
