"""Bad flow files are refused by the runtime's loader with a message naming the problem,
before anything is built (never an abort inside llama.cpp)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import gguf  # noqa: E402
from fixtures import make_random_gate, make_tiny_lora  # noqa: E402

from loraflow import schema  # noqa: E402
from loraflow.converter.flow import convert_flow  # noqa: E402
from loraflow.errors import FormatError  # noqa: E402

NAMES = ["lang", "math"]


def build_flow(tm, work, tag=""):
    loras = [(n, make_tiny_lora(tm.hf_dir, work / f"{tm.arch}{tag}-{n}", r=4, alpha=8, seed=i + 1))
             for i, n in enumerate(NAMES)]
    gate = make_random_gate(tm.n_layer, 2, tm.n_embd, work / f"{tm.arch}{tag}-gate", NAMES, seed=3)
    return convert_flow(tm.gguf, loras, gate, work / f"{tm.arch}{tag}-flow.gguf", outtype="f32")


@pytest.fixture(scope="module")
def good(tiny_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("errors")
    llama = tiny_models.get("llama")
    return dict(work=work, llama=llama, flow=build_flow(llama, work),
                qwen3_flow=build_flow(tiny_models.get("qwen3"), work))


def rewrite(src, dst, arch=None, kv=None, drop=(), tensors=None):
    """Copy a GGUF with another arch, replaced key values (key -> (value, GGUFValueType)),
    dropped tensors and replaced tensor data (name -> numpy array in numpy order)."""
    kv, tensors = dict(kv or {}), dict(tensors or {})
    reader = gguf.GGUFReader(str(src))
    arch = arch or bytes(reader.fields[schema.KEY_GENERAL_ARCH].parts[-1]).decode()
    writer = gguf.GGUFWriter(str(dst), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == schema.KEY_GENERAL_ARCH:
            continue
        value, vtype = kv.pop(name, (field.contents(), field.types[0]))
        writer.add_key_value(name, value, vtype, sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for name, (value, vtype) in kv.items():
        writer.add_key_value(name, value, vtype)
    for t in reader.tensors:
        if t.name in drop:
            continue
        if t.name in tensors:
            writer.add_tensor(t.name, tensors[t.name])
        else:  # the flow files here are F32: keep the data as it is
            writer.add_tensor(t.name, np.array(t.data).reshape([int(d) for d in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def load(base, flow):
    from loraflow.runtime import FlowLlama

    return FlowLlama(str(base), flow_path=str(flow), n_ctx=64, n_threads=1, verbose=False)


def refused(base, flow, *fragments):
    with pytest.raises(FormatError) as info:
        load(base, flow)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"


def test_good_file_loads(good):
    llm = load(good["llama"].gguf, good["flow"])
    assert llm.adapter_names == NAMES
    llm.close()


def test_wrong_arch(good):
    refused(good["llama"].gguf, good["qwen3_flow"], "made for a 'qwen3' model", "base model is 'llama'")


def test_other_arch(good):
    bad = rewrite(good["flow"], good["work"] / "phi3.gguf", arch="phi3")
    refused(good["llama"].gguf, bad, "made for a 'phi3' model, but the base model is 'llama'")


def test_wrong_layer_count(good):
    bad = rewrite(good["flow"], good["work"] / "layers.gguf", kv={schema.KEY_N_LAYER: (5, gguf.GGUFValueType.UINT32)})
    refused(good["llama"].gguf, bad, "5 layers", "this one has 2")


def test_wrong_lora_shape(good):
    n_embd = good["llama"].n_embd
    bad = rewrite(good["flow"], good["work"] / "shape.gguf",
                  tensors={"blk.0.attn_q.flow_a": np.ones((8, n_embd + 4), dtype=np.float32)})
    refused(good["llama"].gguf, bad, "blk.0.attn_q.flow_a", f"[{n_embd + 4}, 8", f"expected [{n_embd}, 8]")


def test_wrong_k(good):
    bad = rewrite(good["flow"], good["work"] / "k.gguf", kv={schema.KEY_ADAPTER_COUNT: (3, gguf.GGUFValueType.UINT32)})
    refused(good["llama"].gguf, bad, schema.KEY_ADAPTER_NAMES, "array of 3")


def test_gate_with_wrong_k(good):
    n_embd = good["llama"].n_embd
    bad = rewrite(good["flow"], good["work"] / "gatek.gguf",
                  tensors={"blk.1.flow_gate.weight": np.zeros((3, n_embd), dtype=np.float32)})
    refused(good["llama"].gguf, bad, "blk.1.flow_gate.weight", f"expected [{n_embd}, 2]")


def test_missing_gate_tensor(good):
    bad = rewrite(good["flow"], good["work"] / "nogate.gguf", drop={"blk.1.flow_gate.bias"})
    refused(good["llama"].gguf, bad, "missing gate tensor blk.1.flow_gate.bias")


def test_missing_lora_half(good):
    bad = rewrite(good["flow"], good["work"] / "nob.gguf", drop={"blk.0.ffn_up.flow_b"})
    refused(good["llama"].gguf, bad, "blk.0.ffn_up.weight", "no flow_b")


def test_nan_in_gate(good):
    n_embd = good["llama"].n_embd
    w = np.zeros((2, n_embd), dtype=np.float32)
    w[1, 3] = np.nan
    bad = rewrite(good["flow"], good["work"] / "nan.gguf", tensors={"blk.0.flow_gate.weight": w})
    refused(good["llama"].gguf, bad, "blk.0.flow_gate.weight", "NaN")


def test_not_a_gguf(good):
    path = good["work"] / "notes.gguf"
    path.write_text("these are not the tensors you are looking for\n")
    refused(good["llama"].gguf, path, "not a readable GGUF")


def test_truncated(good):
    data = good["flow"].read_bytes()
    path = good["work"] / "truncated.gguf"
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match="truncated|corrupt"):
        load(good["llama"].gguf, path)


def test_stock_lora_is_not_a_flow_file(good):
    bad = rewrite(good["flow"], good["work"] / "lora.gguf", kv={schema.KEY_ADAPTER_TYPE: ("lora", gguf.GGUFValueType.STRING)})
    refused(good["llama"].gguf, bad, "not a LoRA-Flow adapter", "adapter.type = 'lora'")


def test_missing_file(good):
    refused(good["llama"].gguf, good["work"] / "nope.gguf", "no such flow file")


def test_bad_mode(good):
    from loraflow.errors import LoraFlowError

    llm = load(good["llama"].gguf, good["flow"])
    with pytest.raises(LoraFlowError, match="no adapter named 'code'"):
        llm.set_mode("single:code")
    with pytest.raises(LoraFlowError, match="unknown mode"):
        llm.set_mode("dynamc")
    llm.close()
