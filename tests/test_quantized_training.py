"""Training over a GGUF base's quantized weights (gate_training/quantized.py).

- Every type's torch dequantizer gives gguf-py's numpy dequantize bit for bit: blocks gguf-py
  quantizes (the legacy types, BF16), and random blocks with finite scales (all block types,
  the K-quants included: gguf-py cannot quantize those).
- Other types are refused, naming the type and the tensor.
- A tiny llama-shaped GGUF of each type (every matrix of that type, n_embd 256 so K blocks fit;
  tied and untied output): the quantized model (QuantLinear, QuantEmbedding, the q/k rows in
  transformers' order) gives the dequantized model's losses and gate gradients within 1e-6
  relative, under a FlowModel with two LoRAs and random gates.
- `train-gate` over a Q4_K GGUF trains the same gate quantized (the default, with and without
  --gradient-checkpointing) and --dequantize.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q  # noqa: E402

from loraflow import synthetic  # noqa: E402
from loraflow.errors import FormatError  # noqa: E402
from loraflow.gate_training import quantized as qz  # noqa: E402

ALL_TYPES = (Q.F32, Q.F16, Q.BF16) + (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)

BLOCK_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
NUMPY_QUANTIZES = (Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)     # gguf-py quantizes these
# byte offsets of each block's float16 scales (d, and dmin or m), a typical d (weights of a size a
# trained model has, RMS about 0.02 to 0.05) and the min field in units of d that centres them
# (the mean quant: w = d sc q - dmin m, or d q + m for Q4_1/Q5_1)
F16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
              Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
TYPICAL_D = {Q.Q4_0: 5e-3, Q.Q4_1: 5e-3, Q.Q5_0: 2e-3, Q.Q5_1: 2e-3, Q.Q8_0: 3e-4, Q.Q2_K: 1e-3,
             Q.Q3_K: 3e-4, Q.Q4_K: 1e-4, Q.Q5_K: 5e-5, Q.Q6_K: 1.5e-5}
CENTRE = {Q.Q4_1: -7.5, Q.Q5_1: -15.5, Q.Q2_K: 1.5, Q.Q4_K: 7.5, Q.Q5_K: 15.5}


def random_blocks(qtype, n_rows: int, n_cols: int, rng) -> np.ndarray:
    """uint8 [n_rows, row_bytes]: random quants, random finite float16 scales about TYPICAL_D
    (and a min field, where the type has one, that centres the weights about 0)."""
    block, size = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (n_rows, n_cols // block, size), dtype=np.uint8)
    for i, at in enumerate(F16_FIELDS[qtype]):
        d = TYPICAL_D[qtype] * (CENTRE[qtype] if i else 1.0) * rng.uniform(0.8, 1.2, data.shape[:2])
        data[..., at:at + 2] = d.astype(np.float16)[..., None].view(np.uint8)
    return data.reshape(n_rows, -1)


def numpy_dequantize(raw: np.ndarray, qtype, n_cols: int) -> np.ndarray:
    if qtype == Q.F32:
        return raw.view(np.float32)
    if qtype == Q.F16:
        return raw.view(np.float16).astype(np.float32)
    return gguf.quants.dequantize(raw, qtype).reshape(raw.shape[0], n_cols)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_random_blocks_dequantize_as_gguf_py(qtype):
    rng = np.random.default_rng(int(qtype))
    n_rows, n_cols = 24, 512
    raw = random_blocks(qtype, n_rows, n_cols, rng)
    ref = numpy_dequantize(raw.copy(), qtype, n_cols)
    assert np.isfinite(ref).all() and 0.003 < float(np.sqrt((ref ** 2).mean())) < 0.2
    got = qz.dequantize(torch.from_numpy(raw), qtype, n_cols)
    assert got.dtype == torch.float32 and got.shape == (n_rows, n_cols)
    assert np.array_equal(got.numpy(), ref)
    # any leading shape, and rows picked out of the matrix (the embedding's lookup)
    rows = torch.tensor([[3, 0], [23, 3]])
    assert np.array_equal(qz.dequantize(torch.from_numpy(raw)[rows], qtype, n_cols).numpy(), ref[rows.numpy()])


@pytest.mark.parametrize("qtype", (Q.F32, Q.F16, *NUMPY_QUANTIZES), ids=lambda t: t.name)
def test_quantized_weights_dequantize_as_gguf_py(qtype):
    rng = np.random.default_rng(int(qtype) + 100)
    w = (rng.standard_normal((16, 256)) * 0.02).astype(np.float32)
    w[0, :32] = 0                           # a block of zeros (d = 0)
    if qtype == Q.F32:
        raw = w.view(np.uint8)
    elif qtype == Q.F16:
        raw = w.astype(np.float16).view(np.uint8)
    else:
        raw = gguf.quants.quantize(w, qtype)
    ref = numpy_dequantize(raw.copy(), qtype, 256)
    got = qz.dequantize(torch.from_numpy(np.ascontiguousarray(raw)), qtype, 256)
    assert np.array_equal(got.numpy(), ref)
    assert np.abs(ref - w).max() < 0.02     # and they are the weights, quantized


@pytest.mark.parametrize("qtype", (Q.Q8_K, Q.IQ4_NL, Q.TQ2_0, Q.I8), ids=lambda t: t.name)
def test_other_types_are_refused_naming_type_and_tensor(qtype):
    with pytest.raises(FormatError, match=rf"blk\.3\.ffn_up\.weight is {qtype.name}\b.*--dequantize"):
        qz.check_type(qtype, "blk.3.ffn_up.weight")
    with pytest.raises(FormatError, match=qtype.name):
        qz.dequantize(torch.zeros(1, 256, dtype=torch.uint8), qtype, 256)


# -- tiny GGUF models of every type ----------------------------------------------------------------

N_EMBD, N_LAYER, N_HEAD, N_KV, HEAD, N_FF, N_VOCAB = 256, 2, 4, 2, 64, 512, 512


def encode(w: np.ndarray, qtype, rng):
    """(data, raw_dtype) for GGUFWriter.add_tensor: `w` in `qtype` (gguf-py quantizes what it can;
    K types get random blocks of the same size)."""
    if qtype == Q.F32:
        return w, None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    if qtype in NUMPY_QUANTIZES:
        return gguf.quants.quantize(w, qtype), qtype
    return random_blocks(qtype, w.shape[0], w.shape[1], rng), qtype


def write_tiny_llama(path, qtype, tied: bool = True, seed: int = 0):
    """A llama GGUF, 2 layers of n_embd 256 (4 heads, 2 KV heads, FFN 512), every matrix `qtype`,
    norms F32, a SentencePiece vocabulary of 512 placeholder pieces (as benchmarks/shapes.py)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(256)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_key_length(HEAD)
    w.add_value_length(HEAD)
    w.add_rope_dimension_count(HEAD)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(N_VOCAB)
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [f"\u2581t{i}" for i in range(N_VOCAB - len(pieces))]
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([-float(i) for i in range(N_VOCAB)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (N_VOCAB - 259))
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def matrix(name, n_out, n_in):
        data, raw = encode((rng.standard_normal((n_out, n_in)) * 0.05).astype(np.float32), qtype, rng)
        w.add_tensor(name, data, raw_dtype=raw)

    def norm(name):
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(N_EMBD)).astype(np.float32))

    matrix("token_embd.weight", N_VOCAB, N_EMBD)
    for i in range(N_LAYER):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight")
        matrix(p + "attn_q.weight", N_HEAD * HEAD, N_EMBD)
        matrix(p + "attn_k.weight", N_KV * HEAD, N_EMBD)
        matrix(p + "attn_v.weight", N_KV * HEAD, N_EMBD)
        matrix(p + "attn_output.weight", N_EMBD, N_HEAD * HEAD)
        norm(p + "ffn_norm.weight")
        matrix(p + "ffn_gate.weight", N_FF, N_EMBD)
        matrix(p + "ffn_up.weight", N_FF, N_EMBD)
        matrix(p + "ffn_down.weight", N_EMBD, N_FF)
    norm("output_norm.weight")
    if not tied:
        matrix("output.weight", N_VOCAB, N_EMBD)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two random LoRAs on every linear module of the tiny llama (its shapes do not depend on the type)."""
    work = tmp_path_factory.mktemp("quantized-loras")
    base = write_tiny_llama(work / "shapes.gguf", Q.F32)
    _, _, shapes = synthetic.base_gguf_shapes(base)
    return [(name, str(synthetic.write_random_peft_adapter(work / name, shapes, r=8, alpha=16, seed=i + 1)))
            for i, name in enumerate(("lang", "math"))]


def flow_loss_and_grads(base, adapters, quantized: bool, seed: int = 0):
    """(loss, [gate weight grads], [gate bias grads]) of one batch under random gates."""
    from loraflow.gate_training.load import load_flow_model
    from loraflow.gate_training.train import response_loss

    flow = load_flow_model(base, adapters, quantized=quantized)
    torch.manual_seed(seed)
    ids = torch.randint(3, N_VOCAB, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0                                   # a padded row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100                               # the prompt
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    flow.set_input_scales(flow.measure_input_scales([batch]))     # as training does: W acts on unit inputs
    with torch.no_grad():
        for g in flow.gates:
            g.weight.normal_(0, 1.0)
    loss, n = response_loss(flow.model, batch)
    loss.backward()
    return (loss.item() / n, [g.weight.grad.clone() for g in flow.gates], [g.bias.grad.clone() for g in flow.gates],
            flow)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_quantized_model_equals_dequantized(tmp_path, adapters, qtype):
    torch.set_num_threads(1)
    tied = int(qtype) % 2 == 0
    base = write_tiny_llama(tmp_path / f"tiny-{qtype.name}.gguf", qtype, tied=tied, seed=int(qtype))
    loss_q, gw_q, gb_q, flow = flow_loss_and_grads(base, adapters, quantized=True)
    loss_d, gw_d, gb_d, _ = flow_loss_and_grads(base, adapters, quantized=False)
    # every matrix is held as blocks, none as a float weight
    kinds = {type(m).__name__ for m in flow.model.modules()}
    assert "Linear" not in kinds and "Embedding" not in kinds and {"QuantLinear", "QuantEmbedding"} <= kinds
    floats = sum(p.numel() for p in flow.model.parameters())
    assert floats == (2 * N_LAYER + 1) * N_EMBD, "only the norms are float"
    assert np.isfinite(loss_d) and loss_d > 0
    assert abs(loss_q - loss_d) <= 1e-6 * abs(loss_d)
    for q, d in zip(gw_q + gb_q, gw_d + gb_d):
        assert d.norm() > 0 and rel(q, d) <= 1e-6


def test_train_gate_same_gate_quantized_and_dequantized(tmp_path, adapters):
    import json

    from safetensors.numpy import load_file

    from loraflow.cli import main

    base = write_tiny_llama(tmp_path / "tiny-Q4_K.gguf", Q.Q4_K, seed=5)
    rng = np.random.default_rng(0)
    rows = [{"prompt": " ".join(f"t{i}" for i in rng.integers(0, 200, 4)),
             "response": " ".join(f"t{i}" for i in rng.integers(0, 200, 6))} for _ in range(12)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gates, runs = {}, {}
    for how, extra in (("quantized", []), ("dequantized", ["--dequantize"]),
                       ("checkpointed", ["--gradient-checkpointing"])):
        out = tmp_path / how
        args = ["train-gate", "--base", base, *[a for n, d in adapters for a in ("--adapter", f"{n}={d}")],
                "--data", data, "-o", out, "--epochs", "2", "--batch-size", "4", "--threads", "1", "-q", *extra]
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        gates[how] = load_file(str(out / "gate.safetensors"))
        runs[how] = json.loads((out / "run.json").read_text())
    assert runs["quantized"]["base_weights"] == "quantized" and runs["dequantized"]["base_weights"] == "dense"
    assert runs["quantized"]["device"] == "cpu"
    for key, d in gates["dequantized"].items():
        assert np.abs(d).max() > 0
        np.testing.assert_allclose(gates["quantized"][key], d, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(gates["checkpointed"][key], d, rtol=1e-5, atol=1e-7)
    losses = [[e["train_loss"] for e in runs[h]["epochs"]] for h in ("quantized", "dequantized")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    assert losses[0][-1] < losses[0][0]


def test_device_choices(monkeypatch):
    from loraflow.errors import LoraFlowError
    from loraflow.gate_training.load import pick_device

    assert pick_device("cpu") == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert pick_device("auto") == expected
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(LoraFlowError, match="device mps: no Apple GPU"):
        pick_device("mps")
    with pytest.raises(LoraFlowError, match="choose cpu, cuda, mps or auto"):
        pick_device("tpu")
