"""FlowModel (gate_training/model.py) against PEFT and a plain per-token computation; peft_io refusals."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file as save_pt
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from fixtures import ALL_TARGETS
from loraflow import schema
from loraflow.errors import ConversionError, FormatError, LoraFlowError
from loraflow.gate_training.model import FlowModel
from loraflow.peft_io import read_peft_adapter

TOL = 1e-5
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256)
ARCHS = {
    "llama": (LlamaForCausalLM, LlamaConfig(**SMALL)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SMALL)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**SMALL, head_dim=16)),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig(**SMALL, head_dim=16)),
}
ALL = list(ALL_TARGETS)
# Unequal ranks, one rsLoRA, one adapter on a few modules of layer 1 only.
ADAPTERS = {
    "lang": dict(r=4, lora_alpha=8, target_modules=ALL),
    "task": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "style": dict(r=2, lora_alpha=2, target_modules=["o_proj", "up_proj"], layers_to_transform=[1]),
}
IDS = torch.tensor([[3, 17, 42, 99, 5, 250, 7], [1, 2, 3, 4, 5, 6, 7]])


class Setup:
    def __init__(self, base, dirs):
        self.base, self.dirs = base, dirs

    def fresh(self):
        return copy.deepcopy(self.base)

    def flow(self, names, **kw):
        return FlowModel(self.fresh(), [read_peft_adapter(self.dirs[n]) for n in names], names, **kw).eval()

    def peft(self, names):
        model = PeftModel.from_pretrained(self.fresh(), self.dirs[names[0]], adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(self.dirs[n], adapter_name=n)
        model.base_model.set_adapter(list(names))
        return model.eval()


@pytest.fixture(scope="module", params=list(ARCHS))
def setup(request, tmp_path_factory):
    cls, cfg = ARCHS[request.param]
    torch.manual_seed(0)
    base = cls(copy.deepcopy(cfg)).eval()
    dirs = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        p = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kw))
        dirs[name] = tmp_path_factory.mktemp(f"{request.param}_{name}")
        p.save_pretrained(dirs[name])
    return Setup(base, dirs)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    cls, cfg = ARCHS["llama"]
    torch.manual_seed(0)
    base = cls(copy.deepcopy(cfg)).eval()
    dirs = {}
    for i, name in enumerate(("lang", "task")):
        torch.manual_seed(100 + i)
        p = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **ADAPTERS[name]))
        dirs[name] = tmp_path_factory.mktemp(f"llama_{name}")
        p.save_pretrained(dirs[name])
    return Setup(base, dirs)


def logits(model, **kw):
    with torch.no_grad():
        return model(IDS, **kw).logits


def randomize_gates(flow, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in flow.gates:
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.5)
            gate.bias.copy_(torch.randn(gate.bias.shape, generator=g) * 0.5)


# -- (a) single, (b) off ------------------------------------------------------------------------

def test_single_equals_peft(setup):
    names = list(ADAPTERS)
    flow = setup.flow(names)
    for name in names:
        flow.set_mode(f"single:{name}")
        ref = logits(setup.peft([name]))
        got = logits(flow)
        assert (ref - logits(setup.base)).abs().max() > 1e-2      # the adapter does change the output
        torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
        w = flow.last_gate_weights()
        assert w.shape == (2, IDS.shape[1], 2, 3)
        assert np.all(w[..., names.index(name)] == 1) and w.sum() == w.size / 3


def test_off_equals_base(setup):
    flow = setup.flow(list(ADAPTERS))
    flow.set_mode("off")
    torch.testing.assert_close(logits(flow), logits(setup.base), atol=TOL, rtol=0)
    assert not flow.last_gate_weights().any()


# -- (c) static -----------------------------------------------------------------------------------

def peft_weighted(setup, names, weights):
    """PEFT with several active adapters, each LoRA layer's scaling multiplied by weights[layer][i]."""
    model = setup.peft(names)
    for full, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            layer = int(full.split(".layers.")[1].split(".")[0])
            for i, n in enumerate(names):
                if n in mod.scaling:
                    mod.scaling[n] *= float(weights[layer][i])
    return model


def test_static_equals_weighted_peft(llama):
    names = ["lang", "task"]
    flow = llama.flow(names)
    flow.set_mode("static", [0.7, -0.3])
    torch.testing.assert_close(logits(flow), logits(peft_weighted(llama, names, [[0.7, -0.3]] * 2)), atol=TOL, rtol=0)

    per_layer = [[1.2, 0.1], [-0.4, 0.9]]
    flow.set_mode("static", per_layer)
    torch.testing.assert_close(logits(flow), logits(peft_weighted(llama, names, per_layer)), atol=TOL, rtol=0)
    w = flow.last_gate_weights()
    assert np.allclose(w, np.broadcast_to(np.array(per_layer, np.float32), w.shape))

    flow.set_mode("average")
    torch.testing.assert_close(logits(flow), logits(peft_weighted(llama, names, [[0.5, 0.5]] * 2)), atol=TOL, rtol=0)


def test_mode_errors(llama):
    flow = llama.flow(["lang", "task"])
    with pytest.raises(LoraFlowError, match="no adapter named 'nope'"):
        flow.set_mode("single:nope")
    with pytest.raises(LoraFlowError, match=r"shape \(2,\) or \(2, 2\)"):
        flow.set_mode("static", [1, 2, 3])
    with pytest.raises(LoraFlowError, match="unknown mode"):
        flow.set_mode("dynamc")


# -- (d) dynamic against a per-token loop ---------------------------------------------------------

def brute_force_dynamic(setup, names, gates, temperature):
    """The paper's formula token by token on the bare model, LoRA weights taken from PEFT itself."""
    lora = {}   # (layer, module) -> [(i, A, B, s)]
    for full, mod in setup.peft(names).named_modules():
        if isinstance(mod, LoraLayer):
            layer = int(full.split(".layers.")[1].split(".")[0])
            for i, n in enumerate(names):
                if n in mod.lora_A:
                    entry = (i, mod.lora_A[n].weight.detach(), mod.lora_B[n].weight.detach(), mod.scaling[n])
                    lora.setdefault((layer, full.rsplit(".", 1)[1]), []).append(entry)

    model = setup.fresh()
    layers = model.model.layers
    w = {}       # layer -> [batch, seq, k]
    hooks = []

    def set_gate(l, x):       # x: residual stream entering layer l
        W, b = gates[l]
        out = torch.zeros(x.shape[0], x.shape[1], len(names))
        for bi in range(x.shape[0]):
            for t in range(x.shape[1]):
                out[bi, t] = torch.softmax(W @ x[bi, t] / temperature, 0) + b
        w[l] = out

    hooks.append(model.model.embed_tokens.register_forward_hook(lambda m, a, out: set_gate(0, out)))
    for l in range(len(layers) - 1):
        hooks.append(layers[l].register_forward_hook(
            lambda m, a, out, l=l: set_gate(l + 1, out[0] if isinstance(out, tuple) else out)))

    def add_lora(l, module):
        def hook(m, args, y):
            h = args[0]
            y = y.clone()
            for bi in range(h.shape[0]):
                for t in range(h.shape[1]):
                    for i, A, B, s in lora[(l, module)]:
                        y[bi, t] += w[l][bi, t, i] * s * (B @ (A @ h[bi, t]))
            return y
        return hook

    for (l, module) in lora:
        target = [m for n, m in layers[l].named_modules() if n.endswith("." + module)][0]
        hooks.append(target.register_forward_hook(add_lora(l, module)))
    out = logits(model)
    for h in hooks:
        h.remove()
    return out, np.stack([w[l].numpy() for l in range(len(layers))], axis=2)


def test_dynamic_equals_per_token_loop(setup):
    names = list(ADAPTERS)
    flow = setup.flow(names, temperature=0.7)
    randomize_gates(flow)
    got = logits(flow)
    gates = [(g.weight.detach(), g.bias.detach()) for g in flow.gates]
    ref, ref_w = brute_force_dynamic(setup, names, gates, 0.7)
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    w = flow.last_gate_weights()
    assert w.shape == (2, IDS.shape[1], 2, 3)
    np.testing.assert_allclose(w, ref_w, atol=TOL)
    assert w[:, :, 0, 0].std() > 1e-3          # the weights really vary per token


def test_init_gate_is_one_adapter(llama):
    flow = llama.flow(["lang", "task"])           # W = 0, bias [-0.5, 0.5]: task LoRA only
    np.testing.assert_allclose(flow.gates[0].bias.detach().numpy(), [-0.5, 0.5])
    got = logits(flow)
    torch.testing.assert_close(got, logits(llama.peft(["task"])), atol=TOL, rtol=0)
    flow0 = llama.flow(["lang", "task"], init_adapter=0)
    torch.testing.assert_close(logits(flow0), logits(llama.peft(["lang"])), atol=TOL, rtol=0)


def test_only_gates_train(llama):
    flow = llama.flow(["lang", "task"])
    randomize_gates(flow)
    trainable = {n for n, p in flow.named_parameters() if p.requires_grad}
    assert trainable == {f"gates.{l}.{p}" for l in range(2) for p in ("weight", "bias")}
    out = flow(IDS, labels=IDS)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.gates.parameters())


def test_gemma3_multimodal_language_model_layers(tmp_path):
    """Gemma3ForConditionalGeneration keeps its decoder at model.language_model.layers."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    text = Gemma3TextConfig(**{**SMALL, "vocab_size": 300}, head_dim=16)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                       image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    base = Gemma3ForConditionalGeneration(cfg).eval()
    lc = LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)", init_lora_weights=False)
    get_peft_model(copy.deepcopy(base), lc).save_pretrained(tmp_path)
    adapter = read_peft_adapter(tmp_path)
    assert sorted(adapter.weights)[0] == (0, "mlp.down_proj") and adapter.layers == "model.language_model.layers"
    flow = FlowModel(copy.deepcopy(base), [adapter], ["only"]).eval()
    ref = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert (logits(ref) - logits(base)).abs().max() > 1e-2
    torch.testing.assert_close(logits(flow), logits(ref), atol=TOL, rtol=0)


# -- (e) gate checkpoints ---------------------------------------------------------------------------

def test_gate_round_trip_and_paper_import(llama, tmp_path):
    names = ["lang", "task"]
    flow = llama.flow(names, temperature=0.5)
    randomize_gates(flow, seed=3)
    ref = logits(flow)
    path = flow.save_gate(tmp_path / "ckpt")
    assert path.name == schema.GATE_CKPT_FILE

    loaded = llama.flow(names)
    loaded.load_gate(tmp_path / "ckpt")
    assert loaded.temperature == 0.5
    assert torch.equal(logits(loaded), ref)

    # the LoRA folders swapped under the right names: the checkpoint's digests tell them apart
    swapped = FlowModel(llama.fresh(), [read_peft_adapter(llama.dirs[n]) for n in names[::-1]], names).eval()
    with pytest.raises(LoraFlowError, match=r"the LoRA given as 'lang' .* is the one this gate was trained "
                                            r"with as 'task': the adapter folders look swapped"):
        swapped.load_gate(tmp_path / "ckpt")

    paper = {}
    for i, g in enumerate(flow.gates):
        paper[schema.PAPER_GATE_WEIGHT.format(i=i)] = g.weight.detach().clone()
        paper[schema.PAPER_GATE_BIAS.format(i=i)] = g.bias.detach().clone().reshape(1, 2)
    torch.save(paper, tmp_path / "paper_gate.pt")
    imported = llama.flow(names, temperature=0.5)
    imported.load_paper_gate(tmp_path / "paper_gate.pt")
    assert torch.equal(logits(imported), ref)


def test_input_scales_change_the_parametrization_not_the_gates(llama, tmp_path):
    """set_input_scales rescales the trained parameter so the gates compute what they did; the
    checkpoint holds W (what the runtime applies to x), and loads the same into any scales."""
    names = ["lang", "task"]
    flow = llama.flow(names)
    randomize_gates(flow, seed=4)
    ref, w = logits(flow), [g.weight.detach().clone() for g in flow.gates]
    mask = torch.ones_like(IDS)
    mask[1, 4:] = 0                                # a padded row: its last tokens must not count
    scales = flow.measure_input_scales([{"input_ids": IDS, "attention_mask": mask}])
    rms = [[] for _ in scales]
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw, l=l: rms[l].append(
        (a[0] if a else kw["hidden_states"]).detach().pow(2).mean(-1).sqrt()[mask.bool()]), with_kwargs=True)
        for l, layer in enumerate(flow.model.model.layers)]
    logits(flow)
    for h in hooks:
        h.remove()
    np.testing.assert_allclose(scales, [float(r[0].median()) for r in rms], rtol=1e-6)
    assert all(0 < s < 1 for s in scales)
    flow.set_input_scales([10 * s for s in scales])
    torch.testing.assert_close(logits(flow), ref, atol=TOL, rtol=0)
    for g, w0, s in zip(flow.gates, w, scales):
        torch.testing.assert_close(g.weight.detach(), w0 * 10 * s)
        torch.testing.assert_close(g.effective_weight().detach(), w0)
    flow.save_gate(tmp_path / "ckpt")
    plain = llama.flow(names)                       # input_scale 1: its weight is W
    plain.load_gate(tmp_path / "ckpt")
    torch.testing.assert_close(logits(plain), ref, atol=TOL, rtol=0)
    torch.testing.assert_close(plain.gates[0].weight.detach(), w[0])
    flow.load_gate(tmp_path / "ckpt")               # into the scaled model: the same gates again
    torch.testing.assert_close(logits(flow), ref, atol=TOL, rtol=0)
    with pytest.raises(LoraFlowError, match=r"layer 1: input scale 0.0"):
        flow.set_input_scales([1.0, 0.0])
    with pytest.raises(LoraFlowError, match=r"1 input scales for a model of 2 layers"):
        flow.set_input_scales([1.0])


# -- (f) load errors ---------------------------------------------------------------------------------

def test_gate_load_errors(llama, tmp_path):
    flow = llama.flow(["lang", "task"])

    def write(tensors, name, meta=None):
        save_pt(tensors, str(tmp_path / name), metadata=meta)
        return tmp_path / name

    def gate(k=2, n=64, layers=(0, 1)):
        return {key.format(i=i): torch.zeros(shape) for i in layers
                for key, shape in ((schema.GATE_CKPT_WEIGHT, (k, n)), (schema.GATE_CKPT_BIAS, (k,)))}

    with pytest.raises(FormatError, match=r"k=3 adapters, but the model has k=2"):
        flow.load_gate(write(gate(k=3), "k3.safetensors"))
    with pytest.raises(FormatError, match=r"n_embd=32, but the model's hidden size is 64"):
        flow.load_gate(write(gate(n=32), "n32.safetensors"))
    with pytest.raises(FormatError, match=r"missing layer 1: no tensor layers\.1\.weight"):
        flow.load_gate(write(gate(layers=(0,)), "l1.safetensors"))
    with pytest.raises(FormatError, match=r"gate for layer 2"):
        flow.load_gate(write(gate(layers=(0, 1, 2)), "l3.safetensors"))
    meta = {schema.GATE_CKPT_META_ADAPTERS: json.dumps(["task", "lang"])}
    with pytest.raises(FormatError, match=r"trained for adapters \['task', 'lang'\]"):
        flow.load_gate(write(gate(), "order.safetensors", meta))
    torch.save({schema.PAPER_GATE_WEIGHT.format(i=0): torch.zeros(2, 64),
                schema.PAPER_GATE_BIAS.format(i=0): torch.zeros(1, 2)}, tmp_path / "paper.pt")
    with pytest.raises(FormatError, match=r"missing layer 1: no tensor encoder\.layers\.1"):
        flow.load_paper_gate(tmp_path / "paper.pt")
    # A failed load leaves the gates as they were.
    assert flow.gates[0].weight.abs().sum() == 0 and flow.gates[0].bias[1] == 0.5


def test_adapter_does_not_fit_model(llama, tmp_path):
    cls, cfg = ARCHS["llama"]
    bigger = cls(LlamaConfig(**{**SMALL, "hidden_size": 96, "num_attention_heads": 4})).eval()
    with pytest.raises(FormatError, match=r"layer 0 mlp\.down_proj lora_A \[4, 128\] / lora_B \[64, 4\] do not fit "
                                          r"the base weight \[96, 128\]"):
        FlowModel(bigger, [read_peft_adapter(llama.dirs["lang"])], ["lang"])
    deep = cls(LlamaConfig(**{**SMALL, "num_hidden_layers": 1})).eval()
    with pytest.raises(FormatError, match="layer 1 .* model has 1 layers"):
        FlowModel(deep, [read_peft_adapter(llama.dirs["lang"])], ["lang"])


# -- (g) peft_io ---------------------------------------------------------------------------------------

def test_read_adapter_fields(llama):
    a = read_peft_adapter(llama.dirs["task"], name="task")
    assert (a.r, a.alpha, a.use_rslora, a.name) == (8, 16.0, True, "task")
    assert a.scale == pytest.approx(16 / math.sqrt(8))
    assert a.target_modules == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert a.layers == "model.layers" and a.hf_weight_name(1, "mlp.down_proj") == "model.layers.1.mlp.down_proj.weight"
    assert sorted(a.weights) == [(l, m) for l in (0, 1) for m in a.target_modules]
    A, B = a.weights[(1, "self_attn.v_proj")]
    assert A.shape == (8, 64) and B.shape == (32, 8) and A.dtype == np.float32
    assert read_peft_adapter(llama.dirs["lang"]).scale == 2.0


def write_adapter(path, tensors, **cfg):
    path.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **cfg}
    (path / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_np(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_key_variants_and_bf16(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 8), dtype=np.float32), rng.standard_normal((6, 2), dtype=np.float32)
    tensors = {  # `.default.` adapter infix and a gemma3 multimodal `language_model` prefix
        "base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_A.default.weight": a,
        "base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_B.default.weight": b,
    }
    ad = read_peft_adapter(write_adapter(tmp_path / "a", tensors))
    np.testing.assert_array_equal(ad.weights[(3, "self_attn.q_proj")][0], a)
    np.testing.assert_array_equal(ad.weights[(3, "self_attn.q_proj")][1], b)

    bf = tmp_path / "bf"
    write_adapter(bf, None)
    torch_tensors = {k: torch.from_numpy(v).bfloat16() for k, v in tensors.items()}
    save_pt(torch_tensors, str(bf / "adapter_model.safetensors"))
    A, B = read_peft_adapter(bf).weights[(3, "self_attn.q_proj")]
    np.testing.assert_array_equal(A, torch_tensors[next(iter(tensors))].float().numpy())
    assert A.dtype == np.float32

    binary = tmp_path / "bin"
    write_adapter(binary, None)
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, binary / "adapter_model.bin")
    np.testing.assert_array_equal(read_peft_adapter(binary).weights[(3, "self_attn.q_proj")][1], b)


def test_peft_refusals(llama, tmp_path):
    base = llama.fresh()
    p = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    p.save_pretrained(tmp_path / "dora")
    with pytest.raises(ConversionError, match="DoRA"):
        read_peft_adapter(tmp_path / "dora")
    p = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    p.save_pretrained(tmp_path / "lmhead")
    with pytest.raises(ConversionError, match="lm_head"):
        read_peft_adapter(tmp_path / "lmhead")

    a, b = np.zeros((2, 8), np.float32), np.zeros((6, 2), np.float32)
    key = "base_model.model.model.layers.0.self_attn.{}.lora_{}.weight"
    ok = {key.format("q_proj", "A"): a, key.format("q_proj", "B"): b}
    cases = [
        ("ia3", ok, dict(peft_type="IA3"), "peft_type 'IA3'"),
        ("rankpat", ok, dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
        ("alphapat", ok, dict(alpha_pattern={"v_proj": 1}), "alpha_pattern"),
        ("embed", {**ok, "base_model.model.model.embed_tokens.lora_embedding_A": a}, {}, "token embeddings"),
        ("expert", {k.replace("self_attn.q_proj", "mlp.experts.0.up_proj"): v for k, v in ok.items()}, {},
         "one expert of a MoE layer; LoRA on MoE experts is not supported"),
        ("magnitude", {**ok, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": b[:, 0]},
         {}, "DoRA"),
        ("ranks", {key.format("q_proj", "A"): a, key.format("q_proj", "B"): np.zeros((6, 3), np.float32)}, {},
         r"lora_A \[2, 8\] and lora_B \[6, 3\]"),
        ("halfmissing", {key.format("q_proj", "A"): a}, {}, "no lora_B"),
        ("noweights", None, {}, "no adapter weights"),
    ]
    for name, tensors, cfg, message in cases:
        with pytest.raises(ConversionError, match=message):
            read_peft_adapter(write_adapter(tmp_path / name, tensors, **cfg))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="missing adapter_config.json"):
        read_peft_adapter(tmp_path / "empty")
    # rank_pattern that restates the global rank is fine
    read_peft_adapter(write_adapter(tmp_path / "samerank", ok, rank_pattern={"q_proj": 2}))
