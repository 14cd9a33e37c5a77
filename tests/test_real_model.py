"""The real default model: SmolLM2-135M-Instruct Q4_1 in the runtime against the PyTorch model
of the method on the same weights dequantized by transformers, with two random-but-nontrivial
LoRAs and a random gate."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from loraflow import synthetic  # noqa: E402
from loraflow.converter.flow import convert_flow  # noqa: E402
from loraflow.models import default_model_path  # noqa: E402
from loraflow.peft_io import read_peft_adapter  # noqa: E402

N_POSITIONS = 256
NAMES = ["alpha", "beta"]
STRENGTH = 1.0  # each LoRA moves a module's output by ~7% of the base output; see test_modes_really_differ

TEXT = (
    "The history of mathematics spans thousands of years. Early counting systems used tally marks "
    "carved into bone, and later civilisations in Mesopotamia and Egypt developed written numerals "
    "and methods for arithmetic, geometry and astronomy. Greek mathematicians such as Euclid and "
    "Archimedes introduced proofs and rigorous reasoning, while scholars in India gave the world "
    "the decimal place-value system and the concept of zero. During the Islamic Golden Age, "
    "al-Khwarizmi wrote about algebra, a word that comes from the title of his book. In Europe, the "
    "Renaissance brought renewed interest in classical texts, and the seventeenth century saw the "
    "invention of calculus by Newton and Leibniz. Today mathematics underpins science, engineering, "
    "economics and computing, and new fields such as cryptography and data science continue to grow. "
    "Students learn to add and multiply, to solve equations, and to reason about shapes and chance.\n\n"
    "Weather is the state of the atmosphere at a given time and place. Meteorologists measure "
    "temperature, humidity, wind speed and air pressure with instruments on the ground, on balloons "
    "and on satellites, and feed the numbers into computer models that divide the sky into a grid. "
    "A forecast for tomorrow is usually reliable, while one for next week is much less certain, "
    "because small errors grow quickly in a chaotic system. Farmers plan their harvests around the "
    "rain, airlines route their planes around storms, and families check the forecast before a "
    "picnic. Climate, by contrast, describes the average weather over many years: summers in Spain "
    "are hot and dry, winters in Norway are long and dark, and the rainy season in India brings the "
    "monsoon that millions of people depend on for their crops and drinking water."
)


def dequantized_copy(src, dst):
    """The same weights as F32, through llama.cpp's quantize API (what transformers sees)."""
    import ctypes
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from loraflow.gate_training.model import FlowModel
    from loraflow.runtime import FlowLlama

    base = default_model_path()
    work = tmp_path_factory.mktemp("real")
    n_layer, n_embd, shapes = synthetic.base_gguf_shapes(base)
    dirs = [synthetic.write_random_peft_adapter(work / n, shapes, r=16, alpha=32, seed=11 + i,
                                                  strength=STRENGTH)
            for i, n in enumerate(NAMES)]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base.parent), gguf_file=base.name,
                                                           dtype=torch.float32)
    # a random gate scaled like a trained one: logits spread ~2 over tokens at every layer
    with torch.no_grad():
        ids = torch.tensor([list(range(1000, 1000 + N_POSITIONS))])
        hidden = hf(ids, output_hidden_states=True).hidden_states[:n_layer]
    rms = [float(h.pow(2).mean().sqrt()) for h in hidden]
    gate = synthetic.write_gate_checkpoint(
        work / "gate.safetensors", synthetic.random_gate(n_layer, 2, n_embd, seed=5, scale=2.0, input_rms=rms), NAMES)
    flow = convert_flow(base, list(zip(NAMES, map(str, dirs))), gate, work / "flow.gguf", outtype="f32")

    kw = dict(flow_path=str(flow), n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2, logits_all=True,
              verbose=False, record_gates=True, type_k=0, type_v=0)  # F32 KV cache
    q4 = FlowLlama(str(base), **kw)
    f32 = FlowLlama(str(dequantized_copy(base, work / "base-f32.gguf")), **kw)

    model = FlowModel(hf, [read_peft_adapter(d) for d in dirs], NAMES)
    model.load_gate(gate)

    # a chat prompt and the PyTorch model's own greedy continuation: the positions greedy decoding visits
    model.set_mode("dynamic")
    prompt = q4.tokenize(b"<|im_start|>user\nWrite a short story about a fox who learns to count.<|im_end|>\n"
                         b"<|im_start|>assistant\n", special=True)
    with torch.no_grad():
        greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=N_POSITIONS, min_new_tokens=N_POSITIONS,
                             do_sample=False)[0].tolist()
    natural = q4.tokenize(TEXT.encode())[:N_POSITIONS]
    assert len(greedy) == len(prompt) + N_POSITIONS and len(natural) == N_POSITIONS
    yield dict(q4=q4, f32=f32, model=model, gate=gate, greedy=greedy, decoded=slice(len(prompt) - 1, len(greedy) - 1),
               natural=natural)
    q4.close()
    f32.close()


def torch_logits(model, tokens):
    with torch.no_grad():
        return model.forward(torch.tensor([tokens])).logits[0].numpy()


MODES = ["dynamic", "average", "single:alpha", "off"]


def greedy_agreement(llm, model, mode, tokens, positions):
    llm.set_mode(mode)
    model.set_mode(mode)
    ours = llm.eval_logits(tokens).argmax(-1)[positions]
    ref = torch_logits(model, tokens).argmax(-1)[positions]
    return float((ours == ref).mean())


@pytest.mark.parametrize("mode", ["dynamic", "average", "single:alpha"])
def test_greedy_tokens_agree(setup, mode):
    """Q4_1 runtime vs PyTorch on the dequantized weights: the next-token choices at the 256
    positions of a greedy decoding (a chat prompt and the PyTorch model's continuation).

    The Q4_1 kernels quantize activations to 8 bits, so even the bare base model flips a few
    near-tied choices (measured: 98-99% agreement here, 97% on plain prose); the flow path
    must stay within 2 points of that floor and above 95%."""
    llm, model, tokens, decoded = setup["q4"], setup["model"], setup["greedy"], setup["decoded"]
    floor = greedy_agreement(llm, model, "off", tokens, decoded)
    agreement = greedy_agreement(llm, model, mode, tokens, decoded)
    print(f"{mode}: greedy next tokens agree on {agreement:.1%} of {N_POSITIONS} positions (bare base: {floor:.1%})")
    assert agreement >= 0.95 and agreement >= floor - 0.02, \
        f"{mode}: greedy next tokens agree on {agreement:.1%} of {N_POSITIONS} positions, the bare base on {floor:.1%}"


@pytest.mark.parametrize("mode", MODES)
def test_flow_adds_no_error_of_its_own(setup, mode):
    """On any text the Q4_1 kernels (activations quantized to 8 bits) move logits away from the
    dequantized model; the flow path must not add to that. On the F32 copy of the same weights
    the runtime matches PyTorch to 1e-3 of the logits' scale."""
    model, tokens = setup["model"], setup["natural"]
    model.set_mode(mode)
    ref = torch_logits(model, tokens)
    setup["f32"].set_mode(mode)
    exact = setup["f32"].eval_logits(tokens)
    err = np.abs(exact - ref).max() / np.abs(ref).max()
    assert err < 1e-3, f"{mode}: F32 runtime differs from PyTorch by {err:.2e} of the logits' scale"
    setup["q4"].set_mode(mode)
    q4 = setup["q4"].eval_logits(tokens)
    setup["q4"].set_mode("off")
    model.set_mode("off")
    base_agreement = float((setup["q4"].eval_logits(tokens).argmax(-1) == torch_logits(model, tokens).argmax(-1)).mean())
    agreement = float((q4.argmax(-1) == ref.argmax(-1)).mean())
    assert agreement >= base_agreement - 0.02, f"{mode}: {agreement:.1%} vs the bare base's {base_agreement:.1%}"


def test_modes_really_differ(setup):
    """The LoRAs and the gate are not negligible: each mode changes the logits clearly, and the
    flow adapter changes more greedy choices than the Q4_1 kernels' own rounding does."""
    llm, model, tokens = setup["q4"], setup["model"], setup["natural"]
    logits = {}
    for mode in ["dynamic", "average", "off"]:
        llm.set_mode(mode)
        logits[mode] = llm.eval_logits(tokens)
    scale = np.abs(logits["off"]).max()
    assert np.abs(logits["dynamic"] - logits["off"]).max() > 0.05 * scale
    assert np.abs(logits["dynamic"] - logits["average"]).max() > 0.01 * scale
    changed = (logits["dynamic"].argmax(-1) != logits["off"].argmax(-1)).mean()
    model.set_mode("off")
    rounding = (torch_logits(model, tokens).argmax(-1) != logits["off"].argmax(-1)).mean()
    print(f"the flow adapter changes {changed:.1%} of the greedy next tokens, Q4_1 rounding {rounding:.1%}")
    assert changed > rounding, f"the flow adapter changes {changed:.1%} of the greedy next tokens, " \
                               f"no more than Q4_1 rounding ({rounding:.1%})"


@pytest.mark.parametrize("which", ["q4", "f32"])
def test_gate_weights_match_torch(setup, which):
    """Read-back gate weights against PyTorch's: to 1e-3 on the F32 copy of the weights. On Q4_1
    the layer inputs themselves differ by about a percent (the kernels quantize activations to
    8 bits), and the gate inherits that; the test below shows the gate itself is exact there."""
    llm, model, tokens = setup[which], setup["model"], setup["greedy"]
    llm.set_mode("dynamic")
    model.set_mode("dynamic")
    llm.clear_gate_log()
    llm.eval_logits(tokens)
    ours = llm.gate_weights()
    torch_logits(model, tokens)
    ref = model.last_gate_weights()[0]
    assert ours.shape == ref.shape == (len(tokens), model.n_layer, 2)
    assert ours.std(axis=0).mean() > 0.05, "the random gate should move from token to token"
    err = np.abs(ours - ref).max()
    print(f"{which}: gate weights differ from PyTorch by up to {err:.2e}")
    assert err < (1e-3 if which == "f32" else 0.05), f"{which}: gate weights differ by up to {err:.2e}"



def test_first_layer_gate_is_exact_on_q4(setup):
    """Layer 0 reads the token embeddings, identical on both sides even for Q4_1, so there the
    quantized runtime's gate must equal PyTorch's to float precision."""
    llm, model, tokens = setup["q4"], setup["model"], setup["greedy"]
    llm.set_mode("dynamic")
    model.set_mode("dynamic")
    llm.clear_gate_log()
    llm.eval_logits(tokens)
    torch_logits(model, tokens)
    err = np.abs(llm.gate_weights()[:, 0] - model.last_gate_weights()[0][:, 0]).max()
    assert err < 1e-5, f"layer-0 gate differs by {err:.2e}"
