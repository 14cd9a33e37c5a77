"""The converter: base HF -> GGUF through llama.cpp, PEFT adapters + gate -> LoRA-Flow GGUF.

Expected tensors are rebuilt here from the PEFT safetensors directly (not through
loraflow.peft_io), for every tiny arch with llama-style projection names (Phi-3's and Bloom's
fused ones are the parity tests' business), with the q/k row order read off the base weights llama.cpp's
own converter wrote (unchanged, or llama's RoPE pairs) and derived independently.
"""

import json
import logging
import math
import shutil

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from fixtures import ALL_TARGETS, LLAMA_GGUF_MODULE, TINY_ARCHS, make_random_gate, make_tiny_lora
from loraflow import schema
from loraflow.converter import convert_base, convert_flow
from loraflow.converter.base_info import read_base_info, read_gguf_header
from loraflow.converter.cli import main as cli
from loraflow.digest import file_digest
from loraflow.errors import ConversionError, FormatError, LoraFlowError

NAMES = ["math", "code"]
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


CONVERTER_ARCHS = tuple(a for a in TINY_ARCHS if a not in ("phi3", "bloom"))  # llama-style projections


@pytest.fixture(scope="module")
def models(tiny_models):
    tiny_models.prepare(CONVERTER_ARCHS)  # converts them two at a time
    return tiny_models


@pytest.fixture(scope="module", params=CONVERTER_ARCHS)
def setup(request, models, tmp_path_factory):
    """A tiny model, two LoRAs (math: r=24, all modules; code: r=8 rsLoRA, q/k/v/down of layer 0 only)
    and a random gate; R = 32 so Q8_0 applies to every flow tensor."""
    m = models.get(request.param)
    d = tmp_path_factory.mktemp(f"flow-{m.arch}")
    math_dir = make_tiny_lora(m.hf_dir, d / "math", r=24, alpha=48, targets=ALL_TARGETS, seed=1)
    code_dir = make_tiny_lora(m.hf_dir, d / "code", r=8, alpha=8, targets=["q_proj", "k_proj", "v_proj", "down_proj"],
                              seed=2, use_rslora=True, layers=[0])
    gate = make_random_gate(m.n_layer, 2, m.n_embd, d / "gate", NAMES, seed=3, temperature=0.7)
    return m, d, [("math", math_dir), ("code", code_dir)], gate


def rope_row_order(n_rows, n_head):
    """llama.cpp's llama q/k layout: per head, row pairs (i, i + head_dim/2) become rows (2i, 2i+1)."""
    head_dim = n_rows // n_head
    order = []
    for h in range(n_head):
        for i in range(head_dim // 2):
            order += [h * head_dim + i, h * head_dim + head_dim // 2 + i]
    return np.array(order)


def base_row_order(m, hf_module):
    """The row order llama.cpp's converter gave the base's q/k (layer 1): unchanged, or llama's
    RoPE pairs; asserted to be exactly one of the two."""
    from loraflow.gguf_read import read_header

    cfg = json.loads((m.hf_dir / "config.json").read_text())
    heads = cfg["num_attention_heads"] if hf_module == "q_proj" else cfg["num_key_value_heads"]
    w_hf = load_file(str(m.hf_dir / "model.safetensors"))[f"model.layers.1.self_attn.{hf_module}.weight"]
    w_gguf = read_header(m.gguf).read(f"blk.1.{LLAMA_GGUF_MODULE[hf_module]}.weight")
    rope = rope_row_order(w_hf.shape[0], heads)
    if np.array_equal(w_gguf, w_hf):
        return np.arange(w_hf.shape[0])
    np.testing.assert_array_equal(w_gguf, w_hf[rope])
    return rope


def expected_flow(m, adapters):
    """{(layer, gguf module): (flow_a, flow_b)} from the PEFT files, config.json and the base's q/k order."""
    cfg = json.loads((m.hf_dir / "config.json").read_text())
    row_order = {hf: base_row_order(m, hf) for hf in ("q_proj", "k_proj")}
    loras = []
    for _, path in adapters:
        acfg = json.loads((path / "adapter_config.json").read_text())
        r, alpha = acfg["r"], acfg["lora_alpha"]
        scale = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
        loras.append((r, scale, load_file(str(path / "adapter_model.safetensors"))))
    R = sum(r for r, _, _ in loras)
    out = {}
    for layer in range(cfg["num_hidden_layers"]):
        for hf, module in LLAMA_GGUF_MODULE.items():
            prefix = f"base_model.model.model.layers.{layer}.{PARENT[hf]}.{hf}"
            if not any(f"{prefix}.lora_A.weight" in t for _, _, t in loras):
                continue
            blocks_a, blocks_b = [], []
            for r, scale, t in loras:
                a, b = t.get(f"{prefix}.lora_A.weight"), t.get(f"{prefix}.lora_B.weight")
                if a is None:
                    n_in = next(x[f"{prefix}.lora_A.weight"].shape[1] for _, _, x in loras if f"{prefix}.lora_A.weight" in x)
                    n_out = next(x[f"{prefix}.lora_B.weight"].shape[0] for _, _, x in loras if f"{prefix}.lora_B.weight" in x)
                    a, b, scale = np.zeros((r, n_in)), np.zeros((n_out, r)), 0.0
                blocks_a.append(a)
                blocks_b.append(b * scale)
            fa, fb = np.concatenate(blocks_a, 0), np.concatenate(blocks_b, 1)
            assert fa.shape[0] == R
            if hf in row_order:
                fb = fb[row_order[hf]]
            out[(layer, module)] = (fa.astype(np.float32), fb.astype(np.float32))
    return out


def read_flow(path):
    r = gguf.GGUFReader(str(path))
    meta = {k: (f.contents(), f.types) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in r.tensors}
    return meta, tensors


def dequant(t):
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(x) for x in reversed(t.shape)))


def assert_nothing_left(folder, keep=()):
    left = sorted(p.name for p in folder.iterdir() if p.name not in keep and (p.suffix in (".gguf", ".tmp")))
    assert left == [], f"left behind: {left}"


# ---- base conversion -------------------------------------------------------------------------

def test_base_conversion(setup):
    m, _, _, _ = setup
    meta, shapes = read_gguf_header(m.gguf)
    arch = meta["general.architecture"]  # llama.cpp's: mistral -> llama
    assert meta[f"{arch}.block_count"] == m.n_layer and meta[f"{arch}.embedding_length"] == m.n_embd
    info, hf_info = read_base_info(m.gguf), read_base_info(m.hf_dir)
    assert (info.arch, info.n_layer, info.n_embd) == (hf_info.arch, hf_info.n_layer, hf_info.n_embd) == \
        (meta["general.architecture"], m.n_layer, m.n_embd)
    assert len(info.shapes) == len(hf_info.shapes) == 7 * m.n_layer  # the layers' matrices
    assert info.shapes["blk.0.ffn_down.weight"] == (64, 128) and shapes["blk.0.ffn_down.weight"] == (128, 64)
    assert hf_info.shapes["model.layers.0.mlp.down_proj.weight"] == (64, 128)
    assert info.hparams["architectures"] and hf_info.hparams["architectures"]
    if m.arch not in ("llama", "gemma3"):
        return  # GGUFReader takes seconds per file (it parses the whole vocabulary): two archs suffice

    r = gguf.GGUFReader(str(m.gguf))
    # our fast header reader agrees with GGUFReader on scalars and shapes
    for key, field in r.fields.items():
        if not key.startswith("GGUF.") and len(field.data) == 1:
            assert meta[key] == pytest.approx(field.contents()), key
    assert shapes == {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    # llama.cpp's converter permutes llama's q/k rows (the order expected_flow reads off the base)
    if m.arch == "llama":
        assert not np.array_equal(base_row_order(m, "q_proj"), np.arange(64))


# ---- flow conversion --------------------------------------------------------------------------

def test_flow_f32_round_trip(setup):
    m, d, adapters, gate = setup
    out = convert_flow(m.gguf, adapters, gate, d / "flow-f32.gguf", outtype="f32")
    meta, tensors = read_flow(out)
    V = gguf.GGUFValueType
    rslora_scale = 8 / math.sqrt(8)
    assert meta == {
        schema.KEY_GENERAL_ARCH: (read_base_info(m.gguf).arch, [V.STRING]),
        schema.KEY_GENERAL_TYPE: ("adapter", [V.STRING]),
        schema.KEY_ADAPTER_TYPE: (schema.ADAPTER_TYPE, [V.STRING]),
        schema.KEY_VERSION: (schema.FORMAT_VERSION, [V.UINT32]),
        schema.KEY_N_LAYER: (m.n_layer, [V.UINT32]),
        schema.KEY_N_EMBD: (m.n_embd, [V.UINT32]),
        schema.KEY_ADAPTER_COUNT: (2, [V.UINT32]),
        schema.KEY_ADAPTER_NAMES: (NAMES, [V.ARRAY, V.STRING]),
        schema.KEY_ADAPTER_RANKS: ([24, 8], [V.ARRAY, V.UINT32]),
        schema.KEY_ADAPTER_ALPHAS: ([48.0, 8.0], [V.ARRAY, V.FLOAT32]),
        schema.KEY_ADAPTER_SCALES: (pytest.approx([2.0, rslora_scale]), [V.ARRAY, V.FLOAT32]),
        schema.KEY_GATE_TEMPERATURE: (pytest.approx(0.7), [V.FLOAT32]),
        schema.KEY_GATE_INPUT: (schema.GATE_INPUT, [V.STRING]),
        schema.KEY_DIGEST: (file_digest(out)[1], [V.STRING]),  # what the file hashes to (tests/test_digest.py)
    }

    expected = expected_flow(m, adapters)
    assert len(expected) == 7 * m.n_layer  # math covers everything
    names = {schema.TENSOR_GATE_WEIGHT.format(bid=l) for l in range(m.n_layer)}
    names |= {schema.TENSOR_GATE_BIAS.format(bid=l) for l in range(m.n_layer)}
    for layer, module in expected:
        names |= {schema.TENSOR_FLOW_A.format(bid=layer, module=module),
                  schema.TENSOR_FLOW_B.format(bid=layer, module=module)}
    assert set(tensors) == names

    g = load_file(str(gate))
    for l in range(m.n_layer):
        tw, tb = tensors[schema.TENSOR_GATE_WEIGHT.format(bid=l)], tensors[schema.TENSOR_GATE_BIAS.format(bid=l)]
        assert list(tw.shape) == [m.n_embd, 2] and list(tb.shape) == [2]
        assert tw.tensor_type == tb.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(tw.data, g[schema.GATE_CKPT_WEIGHT.format(i=l)])
        np.testing.assert_array_equal(tb.data, g[schema.GATE_CKPT_BIAS.format(i=l)])

    base = read_base_info(m.gguf)
    for (layer, module), (fa, fb) in expected.items():
        ta = tensors[schema.TENSOR_FLOW_A.format(bid=layer, module=module)]
        tb = tensors[schema.TENSOR_FLOW_B.format(bid=layer, module=module)]
        n_out, n_in = base.shapes[f"blk.{layer}.{module}.weight"]
        assert [int(x) for x in ta.shape] == [n_in, 32] and [int(x) for x in tb.shape] == [32, n_out]
        assert ta.tensor_type == tb.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(ta.data, fa)
        np.testing.assert_array_equal(tb.data, fb)
    # zero padding: `code` covers only q/k/v/down of layer 0
    fb = tensors[schema.TENSOR_FLOW_B.format(bid=0, module="attn_output")].data
    assert np.all(fb[:, 24:] == 0) and np.all(fb[:, :24] != 0)
    fa = tensors[schema.TENSOR_FLOW_A.format(bid=0, module="attn_v")].data
    assert np.all(fa[24:] != 0)
    if m.n_layer > 1:
        assert np.all(tensors[schema.TENSOR_FLOW_A.format(bid=1, module="attn_q")].data[24:] == 0)
    assert_nothing_left(d, keep={"flow-f32.gguf"})


def test_hf_base_gives_same_file(setup):
    m, d, adapters, gate = setup
    a = convert_flow(m.gguf, adapters, gate, d / "from-gguf.gguf")
    b = convert_flow(m.hf_dir, adapters, gate, d / "from-hf.gguf")
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_flow_f16_q8_0_within_bounds(setup, outtype):
    m, d, adapters, gate = setup
    out = convert_flow(m.gguf, adapters, gate, d / f"flow-{outtype}.gguf", outtype=outtype, temperature=2.5)
    meta, tensors = read_flow(out)
    assert meta[schema.KEY_GATE_TEMPERATURE][0] == 2.5
    qtype = gguf.GGMLQuantizationType.F16 if outtype == "f16" else gguf.GGMLQuantizationType.Q8_0
    for (layer, module), pair in expected_flow(m, adapters).items():
        for fmt, want in zip((schema.TENSOR_FLOW_A, schema.TENSOR_FLOW_B), pair):
            t = tensors[fmt.format(bid=layer, module=module)]
            assert t.tensor_type == qtype
            got = dequant(t)
            assert got.shape == want.shape
            if outtype == "f16":
                bound = np.abs(want) * 2.0 ** -11 + 1e-7      # half an f16 ulp
            else:  # Q8_0: blocks of 32 along a row, scale d = amax / 127 stored as f16
                amax = np.abs(want).reshape(want.shape[0], -1, 32).max(-1, keepdims=True)
                bound = np.broadcast_to(amax * (0.5 / 127 + 2.0 ** -10), (*amax.shape[:2], 32)).reshape(want.shape)
            err = np.abs(got - want)
            assert np.all(err <= bound), (fmt, layer, module, float(err.max()))
            assert err.max() > 0  # really quantized
    # gates stay F32 and exact
    assert tensors[schema.TENSOR_GATE_WEIGHT.format(bid=0)].tensor_type == gguf.GGMLQuantizationType.F32


def test_q8_0_falls_back_to_f16_for_short_rows(models, tmp_path, caplog):
    m = models.get("llama")
    lora = make_tiny_lora(m.hf_dir, tmp_path / "a", r=4, alpha=4, targets=["q_proj", "down_proj"], seed=5)
    gate = make_random_gate(m.n_layer, 1, m.n_embd, tmp_path / "g", ["a"], seed=6)
    with caplog.at_level(logging.WARNING, logger="loraflow.converter"):
        out = convert_flow(m.gguf, [("a", lora)], gate, tmp_path / "f.gguf", outtype="q8_0")
    _, tensors = read_flow(out)
    Q = gguf.GGMLQuantizationType
    assert tensors["blk.0.attn_q.flow_a"].tensor_type == Q.Q8_0      # rows of n_embd = 64
    assert tensors["blk.0.attn_q.flow_b"].tensor_type == Q.F16       # rows of R = 4
    assert tensors["blk.1.ffn_down.flow_a"].tensor_type == Q.Q8_0     # rows of n_ff = 128
    assert "have rows of a length that is not a multiple of 32 (e.g. blk.0.attn_q.flow_b" in caplog.text
    assert "blk.0.attn_k.flow_a" not in tensors


@pytest.fixture(scope="module")
def llama(models, tmp_path_factory):
    m = models.get("llama")
    d = tmp_path_factory.mktemp("refusals")
    adapters = [("math", make_tiny_lora(m.hf_dir, d / "math", r=8, alpha=16, seed=1)),
                ("code", make_tiny_lora(m.hf_dir, d / "code", r=8, alpha=16, targets=["v_proj"], seed=2))]
    gate = make_random_gate(m.n_layer, 2, m.n_embd, d / "gate", NAMES, seed=3)
    return m, d, adapters, gate


def test_paper_gate(llama, tmp_path):
    m, _, adapters, _ = llama
    rng = np.random.default_rng(7)
    sd = {}
    for i in range(m.n_layer):
        sd[f"base_model.model.{schema.PAPER_GATE_WEIGHT.format(i=i)}"] = torch.tensor(rng.normal(size=(2, m.n_embd)), dtype=torch.float32)
        sd[f"base_model.model.{schema.PAPER_GATE_BIAS.format(i=i)}"] = torch.tensor([[-0.5, 0.5]])
    torch.save(sd, tmp_path / "gate.pt")
    out = convert_flow(m.gguf, adapters, tmp_path / "gate.pt", tmp_path / "f.gguf")
    meta, tensors = read_flow(out)
    assert meta[schema.KEY_GATE_TEMPERATURE][0] == 1.0   # the paper's files record none
    for i in range(m.n_layer):
        np.testing.assert_array_equal(tensors[schema.TENSOR_GATE_WEIGHT.format(bid=i)].data,
                                      sd[f"base_model.model.{schema.PAPER_GATE_WEIGHT.format(i=i)}"].numpy())
        np.testing.assert_array_equal(tensors[schema.TENSOR_GATE_BIAS.format(bid=i)].data, [-0.5, 0.5])


# ---- refusals ---------------------------------------------------------------------------------

def refused(tmp_path, match, base, adapters, gate, exc=LoraFlowError, **kw):
    out = tmp_path / "out" / "flow.gguf"
    out.parent.mkdir(exist_ok=True)
    with pytest.raises(exc, match=match):
        convert_flow(base, adapters, gate, out, **kw)
    assert not out.exists()
    assert_nothing_left(out.parent)
    return out


def test_refuses_unknown_arch(llama, tmp_path):
    """An architecture this llama.cpp does not know (tests/test_arch_support.py: the ones it knows
    but LoRA-Flow refuses)."""
    m, _, adapters, gate = llama
    w = gguf.GGUFWriter(str(tmp_path / "made-up.gguf"), arch="made-up")
    w.add_uint32("made-up.block_count", 2)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    refused(tmp_path, r"architecture 'made-up' is unknown to this llama.cpp", tmp_path / "made-up.gguf", adapters, gate)


def test_refuses_adapter_as_base_and_non_gguf(llama, tmp_path):
    m, d, adapters, gate = llama
    flow = convert_flow(m.gguf, adapters, gate, tmp_path / "flow.gguf")
    refused(tmp_path, "general.type is 'adapter'; --base must be a base model GGUF", flow, adapters, gate)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    refused(tmp_path, "not a GGUF file", tmp_path / "junk.gguf", adapters, gate, exc=FormatError)
    (tmp_path / "cut.gguf").write_bytes(m.gguf.read_bytes()[:2000])
    refused(tmp_path, "truncated or corrupt GGUF header", tmp_path / "cut.gguf", adapters, gate, exc=FormatError)


def test_refuses_lora_for_another_base(llama, models, tmp_path):
    m, d, adapters, gate = llama
    # gemma3 has 3 layers, the llama 2
    g = models.get("gemma3")
    other = make_tiny_lora(g.hf_dir, tmp_path / "g", r=8, alpha=16, targets=["o_proj"], seed=1)
    refused(tmp_path, r"adapter 'code' .*layer 2 self_attn\.o_proj: LoRA for layer 2, but the base model .* has 2 layers",
            m.gguf, [adapters[0], ("code", other)], gate)
    # a lora_B whose rows do not match the base's q_proj
    bad = tmp_path / "bad"
    shutil.copytree(adapters[0][1], bad)
    t = load_file(str(bad / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    t[key] = np.ones((48, 8), np.float32)
    save_file(t, str(bad / "adapter_model.safetensors"))
    refused(tmp_path, r"adapter 'math' .*q_proj.*blk\.1\.attn_q\.weight\): LoRA delta B@A has shape \[48, 64\] "
                      r".*lora_B \[48, 8\].* base tensor blk\.1\.attn_q\.weight is \[64, 64\]",
            m.gguf, [("math", bad), adapters[1]], gate)


def gate_with_digests(src, out_dir, digests):
    """A copy of the gate checkpoint `src` whose metadata records these adapter digests."""
    from safetensors import safe_open

    with safe_open(str(src), framework="numpy") as f:
        meta, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / schema.GATE_CKPT_FILE), metadata=meta | {schema.GATE_CKPT_META_DIGESTS: digests})
    return out_dir / schema.GATE_CKPT_FILE


def test_adapters_checked_against_the_gates_record(llama, tmp_path, caplog):
    """The gate records each slot's LoRA by what it computes: folders swapped under the right
    names are refused naming both; a LoRA the gate never saw converts with a warning."""
    from loraflow.peft_io import read_peft_adapter

    m, d, adapters, gate = llama
    digests = [read_peft_adapter(p).digest() for _, p in adapters]
    recorded = gate_with_digests(gate, tmp_path / "recorded", json.dumps(digests))
    assert convert_flow(m.gguf, adapters, recorded, tmp_path / "ok.gguf").exists()
    swapped = [("math", adapters[1][1]), ("code", adapters[0][1])]
    refused(tmp_path, r"the LoRA given as 'math' \(.*code\) is the one this gate was trained with as 'code': "
                      r"the adapter folders look swapped; the gate's slots are math=.*math, code=.*code",
            m.gguf, swapped, recorded)
    # re-saved in another dtype: the same numbers, the same digest
    resaved = tmp_path / "math-f64"
    shutil.copytree(adapters[0][1], resaved)
    t = load_file(str(resaved / "adapter_model.safetensors"))
    save_file({k: v.astype(np.float64) for k, v in t.items()}, str(resaved / "adapter_model.safetensors"))
    assert read_peft_adapter(resaved).digest() == digests[0]
    other = make_tiny_lora(m.hf_dir, tmp_path / "math2", r=8, alpha=16, seed=11)
    with caplog.at_level(logging.WARNING, logger="loraflow"):
        assert convert_flow(m.gguf, [("math", other), adapters[1]], recorded, tmp_path / "other.gguf").exists()
    assert "the LoRA given as 'math' (" in caplog.text and "is not the one this gate was trained with" in caplog.text
    refused(tmp_path, r"metadata 'adapter_digests' is not a JSON list of 2 digests",
            m.gguf, adapters, gate_with_digests(gate, tmp_path / "bad", json.dumps(digests[:1])), exc=FormatError)


def test_refuses_gate_mismatch(llama, tmp_path):
    m, d, adapters, gate = llama
    g3 = make_random_gate(m.n_layer, 3, m.n_embd, tmp_path / "g3", ["math", "code", "x"])
    refused(tmp_path, r"the gate is for k=3 adapters .*but 2 adapters were given", m.gguf, adapters, g3)
    refused(tmp_path, r"trained for adapters \['math', 'code'\] .*adapters given are \['code', 'math'\]",
            m.gguf, adapters[::-1], gate)
    g_embd = make_random_gate(m.n_layer, 2, 32, tmp_path / "ge", NAMES)
    refused(tmp_path, r"n_embd=32, but the base model .* has n_embd=64", m.gguf, adapters, g_embd)
    g1 = make_random_gate(1, 2, m.n_embd, tmp_path / "g1", NAMES)
    refused(tmp_path, r"missing gate for layer 1: the checkpoint has 1 layers, the base model .* has 2",
            m.gguf, adapters, g1)
    # a hole: layer 1's bias missing, layer 2 present
    t = load_file(str(make_random_gate(3, 2, m.n_embd, tmp_path / "gh", NAMES)))
    del t[schema.GATE_CKPT_BIAS.format(i=1)]
    save_file(t, str(tmp_path / "gh" / "gate.safetensors"))
    refused(tmp_path, r"missing gate for layer 1: no tensor layers\.1\.bias", m.gguf, adapters,
            tmp_path / "gh" / "gate.safetensors", exc=FormatError)
    t = load_file(str(gate))
    t[schema.GATE_CKPT_WEIGHT.format(i=1)][0, 3] = np.nan
    save_file(t, str(tmp_path / "nan.safetensors"))
    refused(tmp_path, "the gate of layer 1 holds NaN or infinite values", m.gguf, adapters, tmp_path / "nan.safetensors")
    refused(tmp_path, "temperature must be positive", m.gguf, adapters, gate, temperature=0.0)
    refused(tmp_path, "outtype 'q4_0' is not one of", m.gguf, adapters, gate, outtype="q4_0")
    refused(tmp_path, "adapter names must be unique", m.gguf, [("a", adapters[0][1]), ("a", adapters[1][1])], gate)


def test_never_overwrites_without_force(llama, tmp_path):
    m, d, adapters, gate = llama
    out = tmp_path / "flow.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(ConversionError, match="already exists; pass --force"):
        convert_flow(m.gguf, adapters, gate, out)
    assert out.read_bytes() == b"precious"
    convert_flow(m.gguf, adapters, gate, out, force=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert_nothing_left(tmp_path, keep={"flow.gguf"})
    before = m.gguf.read_bytes()
    with pytest.raises(ConversionError, match="would overwrite the input"):
        convert_flow(m.gguf, adapters, gate, m.gguf, force=True)
    with pytest.raises(ConversionError, match="would overwrite the input"):
        convert_flow(m.gguf, adapters, gate, adapters[0][1] / "adapter_model.safetensors", force=True)
    assert m.gguf.read_bytes() == before


def test_no_temp_file_left_when_writing_fails(llama, tmp_path, monkeypatch):
    m, d, adapters, gate = llama

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(ConversionError, match=r"flow.gguf: not written \(\[Errno 28\] No space left on device; is the disk full\?\)"):
        convert_flow(m.gguf, adapters, gate, tmp_path / "flow.gguf")
    assert list(tmp_path.iterdir()) == []


# ---- command line ----------------------------------------------------------------------------

def test_cli_flow(llama, tmp_path):
    m, d, adapters, gate = llama
    out = tmp_path / "f.gguf"
    args = ["flow", "--base", str(m.gguf), "--gate", str(gate), "-o", str(out), "--outtype", "f16"]
    for name, path in adapters:
        args += ["--adapter", f"{name}={path}"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(out)
    meta, tensors = read_flow(out)
    assert meta[schema.KEY_ADAPTER_NAMES][0] == NAMES
    assert tensors["blk.0.attn_v.flow_b"].tensor_type == gguf.GGMLQuantizationType.F16

    res = CliRunner().invoke(cli, args)  # exists now
    assert res.exit_code == 1
    assert "error:" in res.stderr and "already exists; pass --force" in res.stderr
    assert "Traceback" not in res.output
    assert CliRunner().invoke(cli, args + ["--force", "--temperature", "0.5"]).exit_code == 0
    assert read_flow(out)[0][schema.KEY_GATE_TEMPERATURE][0] == 0.5

    # k mismatch through the CLI: one adapter for a two-slot gate
    out2 = tmp_path / "g.gguf"
    res = CliRunner().invoke(cli, ["flow", "--base", str(m.gguf), "--gate", str(gate), "-o", str(out2),
                                   "--adapter", f"math={adapters[0][1]}"])
    assert res.exit_code == 1 and "the gate is for k=2 adapters" in res.stderr and "Traceback" not in res.output
    assert not out2.exists()
    res = CliRunner().invoke(cli, ["flow", "--base", str(m.gguf), "--gate", str(gate), "-o", str(out2),
                                   "--adapter", "no-equals-sign"])
    assert res.exit_code == 2 and "expected NAME=PEFT_DIR" in res.stderr


def test_base_conversion_failure(models, tmp_path):
    m = models.get("llama")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in m.hf_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, broken / f.name)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    res = CliRunner().invoke(cli, ["base", str(broken), "-o", str(out_dir / "b.gguf"), "--outtype", "q8_0"])
    assert res.exit_code == 1, res.output
    assert "error: convert_hf_to_gguf.py failed on" in res.stderr and "broken (exit 1)" in res.stderr
    assert "Traceback" not in res.stderr.splitlines()[0]
    assert list(out_dir.iterdir()) == []
    (out_dir / "b.gguf").write_bytes(b"precious")
    res = CliRunner().invoke(cli, ["base", str(m.hf_dir), "-o", str(out_dir / "b.gguf")])
    assert res.exit_code == 1 and "already exists; pass --force" in res.stderr
    assert (out_dir / "b.gguf").read_bytes() == b"precious"


def test_llama_source_dir(monkeypatch, tmp_path):
    from loraflow import llama_source

    real = llama_source.llama_cpp_source_dir()
    monkeypatch.delenv(llama_source.ENV_VAR, raising=False)
    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path))
    with pytest.raises(LoraFlowError, match="run `make install`"):
        llama_source.llama_cpp_source_dir()
    (tmp_path / "native").mkdir()
    (tmp_path / "native" / "current-source").write_text(str(real) + "\n")
    assert llama_source.llama_cpp_source_dir() == real
    monkeypatch.setenv(llama_source.ENV_VAR, str(tmp_path))
    with pytest.raises(LoraFlowError, match="is not a llama.cpp source folder"):
        llama_source.llama_cpp_source_dir()
