"""The parity set-up shared by tests/test_parity.py and tests/check_arch.py: for a tiny model,
LoRAs on every linear module, a random gate scaled to the model's layer inputs, the flow file,
the runtime with it loaded and the PyTorch model of the method (gate_training.model.FlowModel)."""

from __future__ import annotations

import os

import numpy as np
import torch

from fixtures import linear_modules, make_tiny_loras

from loraflow import synthetic

N_TOKENS = 64
TOL = 1e-3  # of the logits' scale
# Layers on a GPU backend (make test-vulkan): -1 every layer, 1 the last one only (the scheduler
# splits the graph between the devices), 0 (the default) the CPU alone.
GPU_LAYERS = int(os.environ.get("LORAFLOW_TEST_GPU_LAYERS", "0"))
RUNTIME = dict(n_ctx=128, n_batch=N_TOKENS, n_ubatch=N_TOKENS, n_threads=2, logits_all=True, flash_attn=False,
               type_k=0, type_v=0, n_gpu_layers=GPU_LAYERS, verbose=False)  # type 0 = F32 KV cache


def lora_spec(linears: list[str]) -> dict:
    """name -> (rank, alpha, targets, rsLoRA, layers), for a layer whose linear modules are `linears`:
    two LoRAs on everything PEFT's "all-linear" picks (one rsLoRA), a third on the first and the
    last linear module of layer 1 only."""
    return {
        "lang": (4, 8, "all-linear", False, None),
        "math": (8, 8, "all-linear", True, None),
        "code": (2, 4, (linears[0], linears[-1]), False, [1]),
    }


def arch_loras(tm, work, spec: dict | None = None) -> dict:
    """The PEFT LoRAs of `spec` (default: lora_spec's three) for the tiny model `tm`, and
    N_TOKENS random tokens."""
    import transformers

    spec = spec or lora_spec(linear_modules(tm.hf_dir))
    loras = make_tiny_loras(tm.hf_dir, work, spec)
    vocab = transformers.AutoConfig.from_pretrained(str(tm.hf_dir)).vocab_size
    tokens = np.random.default_rng(0).integers(10, vocab, N_TOKENS).tolist()
    return dict(tm=tm, work=work, loras=loras, spec=spec, tokens=tokens)


def build_flow(arch_setup: dict, k: int, outtype: str = "f32") -> dict:
    """The first k LoRAs of arch_setup and a random gate whose logits spread about 1 at every layer:
    the flow file (LoRA tensors of `outtype`), FlowLlama with it (recording gates) and the
    FlowModel over the HF model."""
    from transformers import AutoModelForCausalLM

    from loraflow.converter.flow import convert_flow
    from loraflow.gate_training.model import FlowModel
    from loraflow.peft_io import read_peft_adapter
    from loraflow.runtime import FlowLlama

    tm, work = arch_setup["tm"], arch_setup["work"]
    names = list(arch_setup["spec"])[:k]
    temperature = 1.0 if k == 2 else 0.7
    hf = AutoModelForCausalLM.from_pretrained(str(tm.hf_dir), dtype=torch.float32)
    with torch.no_grad():  # the RMS of each layer's input, so every arch's gate logits spread about 1
        hidden = hf(torch.tensor([arch_setup["tokens"]]), output_hidden_states=True).hidden_states[:tm.n_layer]
    rms = [float(h.pow(2).mean().sqrt()) for h in hidden]
    gate = synthetic.write_gate_checkpoint(work / f"gate{k}" / "gate.safetensors",
                                           synthetic.random_gate(tm.n_layer, k, tm.n_embd, seed=k, input_rms=rms),
                                           names, temperature=temperature)
    flow = convert_flow(tm.gguf, [(n, arch_setup["loras"][n]) for n in names], gate,
                        work / (f"flow{k}.gguf" if outtype == "f32" else f"flow{k}-{outtype}.gguf"), force=True,
                        outtype=outtype)
    llm = FlowLlama(str(tm.gguf), flow_path=str(flow), record_gates=True, **RUNTIME)
    model = FlowModel(hf, [read_peft_adapter(arch_setup["loras"][n]) for n in names], names)
    model.load_gate(gate)
    return dict(llm=llm, model=model, names=names, tokens=arch_setup["tokens"], k=k, n_layer=tm.n_layer,
                arch=tm.arch, gate=gate, base=tm.gguf, flow=flow)


def torch_logits(model, tokens):
    with torch.no_grad():
        return model.forward(torch.tensor([tokens])).logits[0].numpy()


def runtime_token_by_token(llm, tokens):
    from loraflow.runtime.llama_api import clear_kv

    llm.reset()
    clear_kv(llm.ctx)
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


# On a GPU backend, stock llama.cpp's own error may exceed TOL (lavapipe's batched matmuls take
# their activations in F16): there the flow path may be off by what stock llama.cpp is on the
# same tokens, plus a quarter for the flow's own matmuls, and never less strict than TOL.
DEVICE_SLACK = 1.25


def set_stock_loras(model_ptr, ctx_ptr, flow, scales) -> None:
    """Stock llama.cpp's own LoRA path on a context: the flow file's adapters exported as stock
    LoRA GGUFs (export-lora divides s_i back out of B and writes alpha = s_i r_i) and set at
    `scales`, which makes it the flow's static mode with those weights."""
    import ctypes
    import tempfile
    from pathlib import Path

    import llama_cpp

    from loraflow.converter.export_lora import export_lora

    with tempfile.TemporaryDirectory() as tmp:
        loras = [llama_cpp.llama_adapter_lora_init(model_ptr, str(
            export_lora(flow.path, name, Path(tmp) / f"{name}.gguf")).encode()) for name in flow.names]
    assert all(loras)
    n = len(loras)
    rc = llama_cpp.llama_set_adapters_lora(ctx_ptr, (llama_cpp.llama_adapter_lora_p_ctypes * n)(*loras), n,
                                          (ctypes.c_float * n)(*scales))
    assert rc == 0


def tolerances(setup) -> dict[str, float]:
    """{"batch": ..., "token": ...}: TOL on the CPU. On a GPU backend the larger of TOL and
    DEVICE_SLACK times stock llama.cpp's error against the PyTorch model, measured once per arch
    and k with the same settings, in the worst of the configurations stock can run too: the base
    alone (PyTorch's off mode), the flow file's LoRAs through stock's own LoRA path at 1/k each
    (average) and each of them alone (single), which do per module the extra matmuls the flow
    graph does. (Device rounding differs between them: smollm3's LoRA "lang" alone is off by
    1.4e-3 in a batch on lavapipe, the average by 1.1e-3.)"""
    if GPU_LAYERS == 0:
        return {"batch": TOL, "token": TOL}
    if "tolerances" not in setup:
        import llama_cpp

        model, tokens, llm, k = setup["model"], setup["tokens"], setup["llm"], setup["k"]
        mode = model.mode
        errs = {}
        configs = [("base alone", "off", None), ("average", "average", [1 / k] * k)]
        configs += [(f"{name} alone", f"single:{name}", [float(i == j) for j in range(k)])
                    for i, name in enumerate(llm.flow.names)]
        for label, torch_mode, scales in configs:
            model.set_mode(torch_mode)
            ref = torch_logits(model, tokens)
            stock = llama_cpp.Llama(str(setup["base"]), **RUNTIME)
            try:
                if scales:
                    set_stock_loras(stock.model, stock.ctx, llm.flow, scales)
                stock.eval(tokens)
                errs[label] = (rel_err(np.array(stock.scores[: len(tokens)], dtype=np.float32), ref),
                               rel_err(runtime_token_by_token(stock, tokens), ref))
            finally:
                stock.close()
        model.set_mode(mode)
        batch, token = (max(e[i] for e in errs.values()) for i in (0, 1))
        setup["tolerances"] = {"batch": max(TOL, DEVICE_SLACK * batch), "token": max(TOL, DEVICE_SLACK * token)}
        print(f"[parity] {setup['arch']} k={k} stock llama.cpp on the device (batch, token by token): " +
              ", ".join(f"{label} {b:.1e} {t:.1e}" for label, (b, t) in errs.items()) +
              f" -> tolerances {setup['tolerances']}")
    return setup["tolerances"]


class MultiSeqContext:
    """A second llama_context of a FlowLlama's model with n_seq sequences and the same flow
    adapter and mode (each sequence may get its own: set_seq_mode), for decoding batches that mix
    sequences. FlowLlama's own context holds one sequence (llama-cpp-python makes it so).
    With flow=False it is stock llama.cpp's context of the base alone (no adapter set)."""

    def __init__(self, llm, n_seq: int, kv_unified: bool = False, flow: bool = True):
        import ctypes

        import llama_cpp

        from loraflow.runtime import _bindings as B
        from loraflow.runtime.flow_llama import set_native_mode
        from loraflow.runtime.llama_api import Batch, Context

        self.B, self.llm, self.flow = B, llm, flow
        params = llama_cpp.llama_context_default_params()
        ctypes.memmove(ctypes.byref(params), ctypes.byref(llm.context_params), ctypes.sizeof(params))
        params.n_seq_max = n_seq
        params.kv_unified = kv_unified
        # room for each sequence, and batches longer than a ubatch (llama.cpp splits them)
        params.n_ctx = max(params.n_ctx, 128 * n_seq)
        params.n_batch = max(params.n_batch, 512)
        self.ctx = Context(llm.model, params)
        if flow:
            assert B.llama_flow_set_adapter(self.ctx.ptr, llm.flow.ptr, None, 0) == 0
            set_native_mode(self.ctx.ptr, llm.mode)
            B.llama_flow_set_record(self.ctx.ptr, True)
        self.batch = Batch(512, n_seq)

    def set_seq_mode(self, seq_id: int, mode: str, weights=None) -> None:
        from loraflow.runtime.flow_llama import set_native_mode

        set_native_mode(self.ctx.ptr, self.llm.resolve_mode(mode, weights), seq_id=seq_id)

    def decode(self, seqs):
        """Decode the token lists `seqs` (sequence i gets seq_id i, positions from 0) in ONE batch;
        return per sequence its logits and the gate rows recorded in batch order."""
        self.batch.set([(t, j, i, True) for i, tokens in enumerate(seqs) for j, t in enumerate(tokens)])
        assert self.ctx.decode(self.batch) == 0
        n_vocab = self.llm.n_vocab()
        total = sum(map(len, seqs))
        logits = np.array([self.ctx.logits(i, n_vocab) for i in range(total)])
        from loraflow.runtime.flow_llama import recorded_gates

        recorded = self.flow and self.B.llama_flow_n_recorded(self.ctx.ptr)
        gates = recorded_gates(self.ctx.ptr, self.llm.flow) if recorded else None
        bounds = np.cumsum([0] + [len(s) for s in seqs])
        return [logits[a:b] for a, b in zip(bounds, bounds[1:])], gates

    def decode_each(self, seqs):
        """Each of `seqs` decoded alone (the cache cleared in between): their logits."""
        out = []
        for tokens in seqs:
            self.ctx.clear_kv()
            out.append(self.decode([tokens])[0][0])
        self.ctx.clear_kv()
        return out

    def close(self):
        if self.flow:
            self.B.llama_flow_set_adapter(self.ctx.ptr, None, None, 0)
        self.ctx.close()
        self.batch.close()


BATCH_TOL = 1e-4  # a sequence in a batch against the same sequence alone, of the logits' scale


def batch_tolerance(llm, seqs, scales=None) -> float:
    """BATCH_TOL on the CPU. On a GPU backend a batch's kernels differ from a lone sequence's
    (other tile shapes, other summation orders), so the bound is the larger of BATCH_TOL and
    DEVICE_SLACK times what stock llama.cpp shows there for the same sequences: the base with
    the flow file's LoRAs (exported as stock LoRAs, at `scales`, default 1 each: the largest
    weight a sequence gives each adapter) through its own LoRA path, which does the same extra
    matmuls per module as the flow graph."""
    if GPU_LAYERS == 0:
        return BATCH_TOL
    stock = MultiSeqContext(llm, len(seqs), flow=False)
    try:
        set_stock_loras(llm.model, stock.ctx.ptr, llm.flow, scales or [1.0] * len(llm.flow.names))
        batched = stock.decode(seqs)[0]
        each = stock.decode_each(seqs)
    finally:
        stock.close()
    err = max(rel_err(b, e) for b, e in zip(batched, each))
    print(f"[batch] stock llama.cpp with the {len(llm.flow.names)} LoRAs on the device (scales {scales}), "
          f"{len(seqs)} sequences in a batch vs alone: {err:.1e}")
    return max(BATCH_TOL, DEVICE_SLACK * err)


def gate_tolerance(logits_tol: float) -> float:
    """Recorded fusion weights of a sequence in a batch against alone (absolute; they are O(1)):
    1e-5 on the CPU; on a GPU backend the layer inputs they are computed from already differ by
    the device's batch rounding, so the weights get the logits' relative bound."""
    return 1e-5 if GPU_LAYERS == 0 else max(1e-5, logits_tol)
