"""Which bases LoRA-Flow takes: the refusals, each with its reason, before anything is built.

Recurrent and hybrid models and encoder-decoders are refused by the converter (by the tensors
gguf-py lists for the architecture) and by the runtime's loader (llama.cpp's own model flags);
LoRA on MoE experts by the PEFT reader and by the loader (a 3-D base weight)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

pytest.importorskip("torch")

from fixtures import make_random_gate, make_tiny_lora, tokenizer_dir  # noqa: E402

from loraflow import schema  # noqa: E402
from loraflow.converter.base import convert_base  # noqa: E402
from loraflow.converter.flow import convert_flow  # noqa: E402
from loraflow.errors import ConversionError, FormatError  # noqa: E402
from loraflow.peft_io import read_peft_adapter  # noqa: E402


def tiny_base(tmp_path, config_cls, **kw):
    """A tiny random model of a config class with SmolLM2's tokenizer, converted by llama.cpp's own
    converter (loraflow-convert base refuses what LoRA-Flow refuses)."""
    import shutil
    import subprocess
    import sys

    from loraflow.llama_source import CONVERT_SCRIPT, llama_cpp_source_dir

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = tokenizer_dir("llama")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    config = getattr(transformers, config_cls)(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                               bos_token_id=tok.bos_token_id, **kw)
    torch.manual_seed(0)
    hf = tmp_path / config_cls
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(hf))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, hf / f)
    out = tmp_path / f"{config_cls}.gguf"
    subprocess.run([sys.executable, str(llama_cpp_source_dir() / CONVERT_SCRIPT), str(hf), "--outfile", str(out),
                    "--outtype", "f32"], check=True, capture_output=True)
    return hf, out


def flow_file_for(base_gguf, out, pairs: dict[str, tuple[int, int]], k=2, r=2):
    """A LoRA-Flow GGUF written directly (not by the converter, which refuses these bases): random
    gates for every layer of `base_gguf` and one LoRA pair per module in `pairs` (module ->
    (n_in, n_out)) on layer 0."""
    from loraflow.gguf_read import read_header

    meta = read_header(base_gguf).meta
    arch = meta["general.architecture"]
    n_layer, n_embd = int(meta[f"{arch}.block_count"]), int(meta[f"{arch}.embedding_length"])
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(out), arch)
    w.add_string(schema.KEY_GENERAL_TYPE, "adapter")
    w.add_string(schema.KEY_ADAPTER_TYPE, schema.ADAPTER_TYPE)
    for key, value in ((schema.KEY_VERSION, schema.FORMAT_VERSION), (schema.KEY_N_LAYER, n_layer),
                       (schema.KEY_N_EMBD, n_embd), (schema.KEY_ADAPTER_COUNT, k)):
        w.add_uint32(key, value)
    V = gguf.GGUFValueType
    w.add_key_value(schema.KEY_ADAPTER_NAMES, [f"a{i}" for i in range(k)], V.ARRAY, sub_type=V.STRING)
    w.add_key_value(schema.KEY_ADAPTER_RANKS, [r] * k, V.ARRAY, sub_type=V.UINT32)
    w.add_key_value(schema.KEY_ADAPTER_ALPHAS, [float(r)] * k, V.ARRAY, sub_type=V.FLOAT32)
    w.add_key_value(schema.KEY_ADAPTER_SCALES, [1.0] * k, V.ARRAY, sub_type=V.FLOAT32)
    w.add_float32(schema.KEY_GATE_TEMPERATURE, 1.0)
    w.add_string(schema.KEY_GATE_INPUT, schema.GATE_INPUT)
    for il in range(n_layer):
        w.add_tensor(schema.TENSOR_GATE_WEIGHT.format(bid=il), rng.normal(size=(k, n_embd)).astype(np.float32))
        w.add_tensor(schema.TENSOR_GATE_BIAS.format(bid=il), np.zeros(k, np.float32))
    for module, (n_in, n_out) in pairs.items():
        w.add_tensor(schema.TENSOR_FLOW_A.format(bid=0, module=module), rng.normal(size=(k * r, n_in)).astype(np.float32))
        w.add_tensor(schema.TENSOR_FLOW_B.format(bid=0, module=module), rng.normal(size=(n_out, k * r)).astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return out


@pytest.fixture(scope="module")
def llama_inputs(tiny_models, tmp_path_factory):
    tm = tiny_models.get("llama")
    work = tmp_path_factory.mktemp("arch-support")
    lora = make_tiny_lora(tm.hf_dir, work / "lora", r=2, alpha=4)
    return [("a", lora)], make_random_gate(tm.n_layer, 1, tm.n_embd, work / "gate", ["a"])


def test_recurrent_base_refused(tmp_path, llama_inputs):
    from loraflow.runtime import FlowLlama

    adapters, gate = llama_inputs
    hf, base = tiny_base(tmp_path, "MambaConfig", hidden_size=64, num_hidden_layers=2, state_size=4,
                         intermediate_size=128)
    for where in (base, hf):  # the converter, from the GGUF or the HF folder
        with pytest.raises(ConversionError, match="'mamba' is recurrent or hybrid"):
            convert_flow(where, adapters, gate, tmp_path / "never.gguf")
        assert not (tmp_path / "never.gguf").exists()
    # and the runtime's loader, for a file made by other means
    flow = flow_file_for(base, tmp_path / "mamba.flow.gguf", {"ssm_in": (64, 256)})
    with pytest.raises(FormatError, match="recurrent or hybrid .*decoder-only transformer stacks only"):
        FlowLlama(str(base), flow_path=str(flow), n_ctx=64, verbose=False)


def test_encoder_decoder_refused(tmp_path, llama_inputs):
    adapters, gate = llama_inputs
    w = gguf.GGUFWriter(str(tmp_path / "t5.gguf"), "t5")
    w.add_uint32("t5.block_count", 2)
    w.add_uint32("t5.embedding_length", 64)
    w.add_tensor("enc.blk.0.attn_q.weight", np.zeros((64, 64), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ConversionError, match="'t5' is an encoder-decoder"):
        convert_flow(tmp_path / "t5.gguf", adapters, gate, tmp_path / "never.gguf")


def test_unknown_architecture_refused(tmp_path, tiny_models, llama_inputs):
    adapters, gate = llama_inputs
    hf = tmp_path / "made-up"
    hf.mkdir()
    cfg = json.loads((tiny_models.get("llama").hf_dir / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "architectures": ["MadeUpForCausalLM"]}))
    with pytest.raises(ConversionError, match="llama.cpp's converter does not know the architecture 'MadeUpForCausalLM'"):
        convert_flow(hf, adapters, gate, tmp_path / "never.gguf")
    with pytest.raises(ConversionError, match="does not know the architecture 'MadeUpForCausalLM'"):
        convert_base(hf, tmp_path / "base.gguf")
    assert not (tmp_path / "base.gguf").exists()


def test_lora_on_moe_experts_refused(tmp_path):
    """A PEFT LoRA on per-expert linears (older transformers MoE layout) is refused by the reader;
    a flow file adapting a base's 3-D expert tensor, by the runtime's loader."""
    from safetensors.numpy import save_file

    from loraflow.runtime import FlowLlama

    d = tmp_path / "experts-lora"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    key = "base_model.model.model.layers.0.mlp.experts.3.up_proj"
    save_file({f"{key}.lora_A.weight": np.ones((2, 64), np.float32), f"{key}.lora_B.weight": np.ones((32, 2), np.float32)},
              str(d / "adapter_model.safetensors"))
    with pytest.raises(ConversionError, match="one expert of a MoE layer; LoRA on MoE experts is not supported"):
        read_peft_adapter(d)

    _, base = tiny_base(tmp_path, "Qwen3MoeConfig", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        num_experts=4, num_experts_per_tok=2, tie_word_embeddings=True)
    flow = flow_file_for(base, tmp_path / "moe.flow.gguf", {"ffn_up_exps": (64, 32)})
    with pytest.raises(FormatError, match="'blk.0.ffn_up_exps.weight' holds the experts of a MoE layer .*"
                                          "LoRA on MoE experts is not supported"):
        FlowLlama(str(base), flow_path=str(flow), n_ctx=64, verbose=False)
