"""`loraflow demo`: the default model with a two-LoRA flow adapter, generating and showing
how its per-layer gates move from token to token.

Until the compose recipe (a trained language + math flow adapter) lands, the adapter is
built from two random-but-nontrivial LoRAs and a random gate: the point is to show the
runtime path end to end (convert -> load -> generate -> read back the gates)."""

from __future__ import annotations

import sys

import numpy as np

from loraflow import synthetic
from loraflow.models import cache_dir, default_model_path


def build_demo_flow(base) -> "Path":
    from loraflow.converter.flow import convert_flow

    work = cache_dir("demo", "random-v1")
    out = work / "flow.gguf"
    if out.exists():
        return out
    n_layer, n_embd, shapes = synthetic.base_gguf_shapes(base)
    names = ["alpha", "beta"]
    dirs = [synthetic.write_random_peft_adapter(work / name, shapes, r=16, alpha=32, seed=i + 1)
            for i, name in enumerate(names)]
    gate = synthetic.write_gate_checkpoint(work / "gate" / "gate.safetensors",
                                           synthetic.random_gate(n_layer, len(names), n_embd, seed=7, scale=4.0), names)
    convert_flow(base, list(zip(names, map(str, dirs))), gate, out, outtype="f16")
    return out


def run_demo(prompt: str, max_tokens: int, threads: int) -> None:
    from loraflow.runtime import FlowLlama

    base = default_model_path()
    flow = build_demo_flow(base)
    llm = FlowLlama(str(base), flow_path=str(flow), n_ctx=1024, n_threads=threads, seed=0,
                    verbose=False, record_gates=True)
    print(f"model: {base.name}\nflow:  {flow} (adapters: {', '.join(llm.adapter_names)}, mode {llm.mode})\n")
    print(f"user: {prompt}\nassistant: ", end="", flush=True)
    for chunk in llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                            temperature=0.0, stream=True):
        print(chunk["choices"][0]["delta"].get("content", ""), end="", flush=True)
    print("\n")
    gates = llm.gate_weights()  # [n_tokens, n_layer, k]
    print(f"gate weights of {gates.shape[0]} evaluated tokens x {gates.shape[1]} layers:")
    print("layer  " + "  ".join(f"{n:>14}" for n in llm.adapter_names))
    for il in range(gates.shape[1]):
        cells = [f"{gates[:, il, i].mean():6.3f}±{gates[:, il, i].std():5.3f}" for i in range(gates.shape[2])]
        print(f"{il:5d}  " + "  ".join(f"{c:>14}" for c in cells))
    llm.close()
    sys.stdout.flush()
