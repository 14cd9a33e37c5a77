"""A tiny flow file for the user-facing runtime tests (generate, chat, serve, trace, batches):
two LoRAs ("lang", "math") and a random gate on the tiny llama model, F32 throughout."""

from __future__ import annotations

from pathlib import Path

from fixtures import make_random_gate, make_tiny_lora

NAMES = ["lang", "math"]


def build_tiny_flow(tm, work: Path, names=NAMES, strength: float = 0.5) -> Path:
    from loraflow.converter.flow import convert_flow

    work = Path(work)
    loras = [(n, make_tiny_lora(tm.hf_dir, work / f"lora-{n}", r=4, alpha=8, seed=i + 1, strength=strength))
             for i, n in enumerate(names)]
    gate = make_random_gate(tm.n_layer, len(names), tm.n_embd, work / "gate", names, seed=5)
    return convert_flow(tm.gguf, loras, gate, work / "flow.gguf", outtype="f32")
