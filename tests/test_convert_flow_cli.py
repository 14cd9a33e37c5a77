"""`loraflow-convert flow` through the command line: .bin adapters, any subset of target
modules, unequal ranks and rsLoRA in one file, every tensor read back within its type's
bound for f32/f16/q8_0 (with the F16 fall-back), `inspect` on the result, and every
unsupported PEFT adapter refused with a message naming what is unsupported, exit code 1 and
no output file."""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from fixtures import ALL_TARGETS, LLAMA_GGUF_MODULE, make_random_gate, make_tiny_lora
from loraflow import schema
from loraflow.converter.cli import main as cli
from loraflow.gguf_read import read_header
from test_converter import expected_flow

HF_MODULE = {v: k for k, v in LLAMA_GGUF_MODULE.items()}


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models.get("llama")


def run_flow(base, adapters, gate, out, *extra, outtype="f32", exit_code=0):
    """`loraflow-convert flow --outtype OUTTYPE`: F32 LoRA tensors unless asked otherwise (the
    tests compare values with PEFT's and stock llama.cpp's); outtype=None passes no --outtype."""
    typed = () if outtype is None else ("--outtype", outtype)
    args = ["flow", "--base", str(base), "--gate", str(gate), "-o", str(out), *typed, *extra]
    for name, path in adapters:
        args += ["--adapter", f"{name}={path}"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == exit_code, res.output
    return res


def no_output(out):
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.suffix in (".gguf", ".tmp")] == []


# ---- inputs ----------------------------------------------------------------------------------

def test_bin_adapter_gives_the_same_file(llama, tmp_path):
    st = make_tiny_lora(llama.hf_dir, tmp_path / "st", r=8, alpha=16, seed=1)
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "adapter_config.json").write_text((st / "adapter_config.json").read_text())
    # what PEFT's save_pretrained(safe_serialization=False) writes: torch.save of the state dict
    torch.save({k: torch.from_numpy(v) for k, v in load_file(str(st / "adapter_model.safetensors")).items()},
               binary / "adapter_model.bin")
    gate = make_random_gate(llama.n_layer, 1, llama.n_embd, tmp_path / "g", ["a"], seed=2)
    run_flow(llama.gguf, [("a", st)], gate, tmp_path / "st.gguf")
    run_flow(llama.gguf, [("a", binary)], gate, tmp_path / "bin.gguf")
    assert (tmp_path / "st.gguf").read_bytes() == (tmp_path / "bin.gguf").read_bytes()


@pytest.fixture(scope="module")
def subsets(llama, tmp_path_factory):
    """Nine adapters of unequal ranks, one rsLoRA, each on a different subset of the seven
    projections: each alone, q+v, and gate+up+down on layer 1 only."""
    d = tmp_path_factory.mktemp("subsets")
    specs = [(f"only_{m}", [m], 2 + i, False, None) for i, m in enumerate(ALL_TARGETS)]
    specs += [("qv", ["q_proj", "v_proj"], 4, True, None), ("mlp1", ["gate_proj", "up_proj", "down_proj"], 3, False, [1])]
    adapters, cover = [], {}
    for seed, (name, targets, r, rslora, layers) in enumerate(specs):
        adapters.append((name, make_tiny_lora(llama.hf_dir, d / name, r=r, alpha=2 * r, targets=targets,
                                              seed=seed + 10, use_rslora=rslora, layers=layers)))
        cover[name] = {(l, LLAMA_GGUF_MODULE[m]) for m in targets
                       for l in (layers if layers is not None else range(llama.n_layer))}
    names = [n for n, _ in adapters]
    gate = make_random_gate(llama.n_layer, len(names), llama.n_embd, d / "gate", names, seed=3, w_std=0.2)
    return d, adapters, cover, gate, specs


def test_any_subset_of_target_modules(llama, subsets):
    d, adapters, cover, gate, specs = subsets
    # one adapter per file: pairs exist exactly where it has LoRA weights
    for name, path in adapters:
        g1 = make_random_gate(llama.n_layer, 1, llama.n_embd, d / f"g-{name}", [name], seed=1)
        out = d / f"one-{name}.gguf"
        run_flow(llama.gguf, [(name, path)], g1, out)
        h = read_header(out)
        pairs = {(int(n.split(".")[1]), n.split(".")[2]) for n in h.tensors if n.endswith(".flow_a")}
        assert pairs == cover[name], name
    # all nine in one file: the union of pairs, each adapter's slot non-zero exactly on its own
    out = d / "all.gguf"
    run_flow(llama.gguf, adapters, gate, out)
    res = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["k"] == 9 and info["R"] == sum(r for _, _, r, _, _ in specs)
    assert info["lora_pairs"] == len(set().union(*cover.values())) == 7 * llama.n_layer
    for a, (name, targets, r, rslora, layers) in zip(info["adapters"], specs):
        assert (a["name"], a["rank"], a["alpha"], a["rslora"]) == (name, r, 2 * r, rslora)
        assert a["scale"] == pytest.approx(2 * r / math.sqrt(r) if rslora else 2.0)
        got = {(int(l), m) for l, mods in a["modules"].items() for m in mods}
        assert got == cover[name], name


def test_subset_adapters_run_like_stock_llama_cpp(llama, subsets):
    """The nine-adapter file in the runtime: single:NAME equals stock llama.cpp with that adapter
    exported (export-lora), so the zero padding of every uncovered module really is inert."""
    import llama_cpp

    from loraflow.runtime import FlowLlama

    d, adapters, _, gate, _ = subsets
    out = d / "all.gguf"
    if not out.exists():
        run_flow(llama.gguf, adapters, gate, out)
    kw = dict(n_ctx=64, n_batch=32, n_ubatch=32, n_threads=2, logits_all=True, flash_attn=False,
              type_k=0, type_v=0, verbose=False)
    tokens = np.random.default_rng(1).integers(10, 40000, 32).tolist()
    llm = FlowLlama(str(llama.gguf), flow_path=str(out), **kw)
    try:
        for name, _ in adapters[::3] + [adapters[-1]]:
            lora = d / f"export-{name}.gguf"
            res = CliRunner().invoke(cli, ["export-lora", str(out), "--adapter", name, "-o", str(lora)])
            assert res.exit_code == 0, res.output
            llm.set_mode(f"single:{name}")
            ours = llm.eval_logits(tokens)
            stock = llama_cpp.Llama(str(llama.gguf), lora_path=str(lora), **kw)
            stock.eval(tokens)
            ref = np.array(stock.scores[:32], dtype=np.float32)
            stock.close()
            assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max(), name
    finally:
        llm.close()


# ---- round trip ------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[12, 32])
def round_trip(request, llama, tmp_path_factory):
    """Two LoRAs (r = R - 4 on every module; r = 4 rsLoRA on q/k/down of layer 0): R = 12 puts
    flow_b rows off the Q8_0 block (the F16 fall-back), R = 32 on it."""
    R = request.param
    d = tmp_path_factory.mktemp(f"round-trip-{R}")
    adapters = [("big", make_tiny_lora(llama.hf_dir, d / "big", r=R - 4, alpha=2 * (R - 4), seed=1)),
                ("small", make_tiny_lora(llama.hf_dir, d / "small", r=4, alpha=4, targets=["q_proj", "k_proj", "down_proj"],
                                         seed=2, use_rslora=True, layers=[0]))]
    gate = make_random_gate(llama.n_layer, 2, llama.n_embd, d / "gate", ["big", "small"], seed=3, temperature=0.8)
    return d, R, adapters, gate


def test_default_lora_type_is_q8_0(llama, round_trip, tmp_path):
    """A user who passes no --outtype gets Q8_0 LoRA tensors (the smallest and, measured, the
    fastest: docs/BENCHMARKS.md), byte for byte the file --outtype q8_0 writes."""
    d, R, adapters, gate = round_trip
    run_flow(llama.gguf, adapters, gate, tmp_path / "default.gguf", outtype=None)
    run_flow(llama.gguf, adapters, gate, tmp_path / "q8_0.gguf", outtype="q8_0")
    assert (tmp_path / "default.gguf").read_bytes() == (tmp_path / "q8_0.gguf").read_bytes()
    types = {t.type for name, t in read_header(tmp_path / "default.gguf").tensors.items() if "flow_gate" not in name}
    assert gguf.GGMLQuantizationType.Q8_0 in types


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_every_tensor_reads_back(llama, round_trip, outtype):
    """Every tensor of the file, through loraflow.gguf_read and gguf's own GGUFReader: gates
    exact, LoRA tensors exact (F32), within half an f16 ulp (F16) or half a Q8_0 step plus the
    f16 rounding of its scale; nothing else in the file."""
    d, R, adapters, gate = round_trip
    out = d / f"flow-{outtype}.gguf"
    run_flow(llama.gguf, adapters, gate, out, outtype=outtype)
    h = read_header(out)
    reader = gguf.GGUFReader(str(out))
    expected = expected_flow(llama, adapters)
    g = load_file(str(gate))
    want = {}
    for l in range(llama.n_layer):
        want[schema.TENSOR_GATE_WEIGHT.format(bid=l)] = g[schema.GATE_CKPT_WEIGHT.format(i=l)]
        want[schema.TENSOR_GATE_BIAS.format(bid=l)] = g[schema.GATE_CKPT_BIAS.format(i=l)]
    for (l, module), (fa, fb) in expected.items():
        want[schema.TENSOR_FLOW_A.format(bid=l, module=module)] = fa
        want[schema.TENSOR_FLOW_B.format(bid=l, module=module)] = fb
    assert list(h.tensors) == [t.name for t in reader.tensors]
    assert set(h.tensors) == set(want)
    Q = gguf.GGMLQuantizationType
    for t in reader.tensors:
        info = h.tensors[t.name]
        value = h.read(t.name)
        assert info.type == t.tensor_type and list(info.shape) == [int(x) for x in t.shape]
        assert info.nbytes == t.n_bytes and info.offset == t.data_offset
        np.testing.assert_array_equal(
            value, gguf.quants.dequantize(t.data, t.tensor_type).reshape(value.shape), err_msg=t.name)
        w = want[t.name]
        assert value.shape == w.shape, t.name
        if "flow_gate" in t.name:
            assert info.type == Q.F32
            np.testing.assert_array_equal(value, w, err_msg=t.name)
            continue
        row_fits = w.shape[-1] % 32 == 0
        expect_type = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0 if row_fits else Q.F16}[outtype]
        assert info.type == expect_type, t.name
        if info.type == Q.F32:
            bound = np.zeros_like(w)
        elif info.type == Q.F16:
            bound = np.abs(w) * 2.0 ** -11 + 2.0 ** -25
        else:
            amax = np.abs(w).reshape(w.shape[0], -1, 32).max(-1, keepdims=True)
            bound = np.broadcast_to(amax * (0.5 / 127 + 2.0 ** -10), (*amax.shape[:2], 32)).reshape(w.shape)
        err = np.abs(value - w)
        assert np.all(err <= bound), (t.name, float(err.max()))
    if outtype == "q8_0":
        assert (h.tensors["blk.0.attn_q.flow_b"].type == Q.Q8_0) == (R == 32)
    # the metadata, through both readers
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert h.meta[key] == pytest.approx(field.contents()), key
    assert h.meta[schema.KEY_ADAPTER_SCALES] == pytest.approx([2.0, 4 / math.sqrt(4)])
    assert h.meta[schema.KEY_GATE_TEMPERATURE] == pytest.approx(0.8)


# ---- refusals --------------------------------------------------------------------------------

def _peft(model_dir, out, config):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    get_peft_model(model, config).save_pretrained(str(out))
    return out


UNSUPPORTED = {
    "dora": (lambda: __import__("peft").LoraConfig(r=4, target_modules=["q_proj"], use_dora=True),
             "DoRA (use_dora=true) is not supported by LoRA-Flow (plain LoRA only)"),
    "embedding": (lambda: __import__("peft").LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]),
                  "is LoRA on the token embeddings; only LoRA on the linear modules of the decoder layers "
                  "is supported"),
    "lm_head": (lambda: __import__("peft").LoraConfig(r=4, target_modules=["lm_head", "q_proj"]),
                "is LoRA on lm_head; only LoRA on the linear modules of the decoder layers"),
    "ia3": (lambda: __import__("peft").IA3Config(target_modules=["k_proj", "down_proj"],
                                                 feedforward_modules=["down_proj"]),
            "peft_type 'IA3' is not supported by LoRA-Flow (plain LoRA only)"),
    "loha": (lambda: __import__("peft").LoHaConfig(r=4, target_modules=["q_proj"]),
             "peft_type 'LOHA' is not supported"),
    "modules_to_save": (lambda: __import__("peft").LoraConfig(r=4, target_modules=["q_proj"],
                                                              modules_to_save=["lm_head"]),
                        "modules_to_save ['lm_head'] (fully trained modules) is not supported"),
    "rank_pattern": (lambda: __import__("peft").LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           rank_pattern={"v_proj": 2}),
                     "rank_pattern with per-module values {'v_proj': 2} (global value 4) is not supported"),
    "lora_bias": (lambda: __import__("peft").LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True),
                  "a LoRA bias (lora_bias=true) is not supported"),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", list(UNSUPPORTED))
def test_unsupported_peft_adapters_refused(llama, tmp_path, kind):
    make_config, message = UNSUPPORTED[kind]
    bad = _peft(llama.hf_dir, tmp_path / kind, make_config())
    good = make_tiny_lora(llama.hf_dir, tmp_path / "good", r=4, alpha=8, targets=["v_proj"], seed=1)
    gate = make_random_gate(llama.n_layer, 2, llama.n_embd, tmp_path / "gate", ["good", "bad"], seed=2)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "flow.gguf"
    res = run_flow(llama.gguf, [("good", good), ("bad", bad)], gate, out, exit_code=1)
    assert message in res.stderr, res.stderr
    assert res.stderr.startswith("error: ") and str(tmp_path / kind) in res.stderr
    assert "Traceback" not in res.output
    no_output(out)


def test_other_flow_refusals(llama, tmp_path):
    """Broken adapters and mismatched shapes through the CLI (test_converter covers the API)."""
    good = make_tiny_lora(llama.hf_dir, tmp_path / "good", r=4, alpha=8, targets=["v_proj"], seed=1)
    gate = make_random_gate(llama.n_layer, 1, llama.n_embd, tmp_path / "gate", ["a"], seed=2)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "flow.gguf"
    cases = []
    no_cfg = tmp_path / "no-config"
    no_cfg.mkdir()
    (no_cfg / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    cases.append((no_cfg, "missing adapter_config.json; is this a PEFT adapter folder?"))
    no_w = tmp_path / "no-weights"
    no_w.mkdir()
    (no_w / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    cases.append((no_w, "no adapter weights (adapter_model.safetensors or adapter_model.bin)"))
    wrong_r = tmp_path / "wrong-r"
    wrong_r.mkdir()
    (wrong_r / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((good / "adapter_config.json").read_text())
    (wrong_r / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    cases.append((wrong_r, "do not share the configured rank r=8"))
    for path, message in cases:
        res = run_flow(llama.gguf, [("a", path)], gate, out, exit_code=1)
        assert message in res.stderr, res.stderr
        assert "Traceback" not in res.output
        no_output(out)
    res = run_flow(llama.gguf, [("a", good)], gate, out, outtype="q4_0", exit_code=2)
    assert "Invalid value for '--outtype'" in res.stderr
    no_output(out)


# ---- inspect ---------------------------------------------------------------------------------

def test_inspect_cli(llama, round_trip, tmp_path):
    d, R, adapters, gate = round_trip
    out = d / "inspect.gguf"
    if not out.exists():
        run_flow(llama.gguf, adapters, gate, out, outtype="q8_0")
    res = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert (info["kind"], info["arch"], info["n_layer"], info["n_embd"], info["k"], info["R"]) == \
        ("lora_flow", "llama", llama.n_layer, llama.n_embd, 2, R)
    assert info["temperature"] == pytest.approx(0.8) and info["file_size"] == out.stat().st_size
    big, small = info["adapters"]
    assert (big["name"], big["rank"], big["rslora"], big["pairs_covered"]) == ("big", R - 4, False, 7 * llama.n_layer)
    assert (small["name"], small["rank"], small["alpha"], small["rslora"]) == ("small", 4, 4.0, True)
    assert small["modules"] == {"0": ["attn_q", "attn_k", "ffn_down"]}
    g = load_file(str(gate))
    for row in info["gates"]:
        w = g[schema.GATE_CKPT_WEIGHT.format(i=row["layer"])]
        assert row["weight_norm"] == pytest.approx(float(np.linalg.norm(w)), rel=1e-6)
        assert row["row_norms"] == pytest.approx(np.linalg.norm(w, axis=1).tolist(), rel=1e-6)
        assert row["bias"] == pytest.approx(g[schema.GATE_CKPT_BIAS.format(i=row["layer"])].tolist())
    assert sum(e["count"] for e in info["tensor_types"].values()) == len(info["tensors"])
    assert sum(e["bytes"] for e in info["tensor_types"].values()) < info["file_size"]

    text = CliRunner().invoke(cli, ["inspect", str(out)]).stdout
    assert f"LoRA-Flow file v1: arch llama, {llama.n_layer} layers, n_embd 64, k = 2 adapters, R = {R}" in text
    assert "[1] small: rank 4, alpha 4, scale 2 (rsLoRA: alpha/sqrt(r)); 3 modules in 1 layer" in text
    assert "layer 0: attn_q attn_k ffn_down" in text
    assert "layers 0-1: attn_q attn_k attn_v attn_output ffn_gate ffn_down ffn_up" in text  # llama.cpp's order
    assert "Q8_0" in text and "gates per layer" in text

    res = CliRunner().invoke(cli, ["inspect", str(llama.gguf)])
    assert res.exit_code == 0 and "model: arch llama" in res.stdout and "vocabulary 49152" in res.stdout
    base = json.loads(CliRunner().invoke(cli, ["inspect", str(llama.gguf), "--json"]).stdout)
    assert (base["kind"], base["n_layer"], base["n_embd"], base["n_head"], base["n_head_kv"], base["vocab_size"]) == \
        ("model", llama.n_layer, 64, 4, 2, 49152)
    assert base["file_type"] == "ALL_F32" and base["tensor_types"]["F32"]["count"] == base["n_tensors"]

    # refusals: not a GGUF, a truncated file, a flow file that breaks the format
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(out.read_bytes()[:-64])
    for path, message in ((tmp_path / "junk.gguf", "not a GGUF file (bad magic)"),
                          (cut, "lies beyond the end of the file")):
        res = CliRunner().invoke(cli, ["inspect", str(path)])
        assert res.exit_code == 1 and message in res.stderr and "Traceback" not in res.output, res.output
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing.gguf")])
    assert res.exit_code == 2 and "does not exist" in res.stderr


def rewrite_flow(src, dst, drop=(), meta=None, add=None):
    """A copy of the f32 flow file `src` with tensors dropped or added and metadata replaced."""
    h = read_header(src)
    w = gguf.GGUFWriter(str(dst), arch=h.meta[schema.KEY_GENERAL_ARCH])
    V = gguf.GGUFValueType
    for key, value in {**h.meta, **(meta or {})}.items():
        if key in (schema.KEY_GENERAL_ARCH, "general.alignment"):
            continue
        vtype = h.types.get(key, (V.STRING,) if isinstance(value, str) else (V.UINT32,))
        if vtype[0] == V.ARRAY:
            w.add_key_value(key, value, V.ARRAY, sub_type=vtype[1])
        else:
            w.add_key_value(key, value, vtype[0])
    for name in h.tensors:
        if name not in drop:
            w.add_tensor(name, h.read(name))
    for name, value in (add or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return dst


def test_broken_flow_files_refused(llama, round_trip, tmp_path):
    """inspect and export-lora read flow files through one validating reader (FORMAT.md's rules
    that need no base model); each broken file is named with what is wrong."""
    d, R, adapters, gate = round_trip
    good = d / "flow-f32.gguf"
    if not good.exists():
        run_flow(llama.gguf, adapters, gate, good)
    cases = {
        "no-gate": (dict(drop=["blk.1.flow_gate.bias"]), "missing gate tensor blk.1.flow_gate.bias"),
        "half": (dict(drop=["blk.0.attn_v.flow_b"]), "blk.0.attn_v: flow_b missing"),
        "extra": (dict(add={"blk.0.attn_q.lora_a": np.zeros((4, 64), np.float32)}),
                  "unexpected tensor blk.0.attn_q.lora_a in a LoRA-Flow file"),
        "layer": (dict(add={"blk.7.attn_q.flow_a": np.zeros((R, 64), np.float32)}),
                  "tensor blk.7.attn_q.flow_a: layer 7 >= n_layer 2"),
        "version": (dict(meta={schema.KEY_VERSION: 2}), "loraflow.version is 2; this loraflow reads version 1"),
        "names": (dict(meta={schema.KEY_ADAPTER_NAMES: ["big"]}), "loraflow.adapter.names should be 2 string values"),
        "temperature": (dict(meta={schema.KEY_GATE_TEMPERATURE: -1.0}), "loraflow.gate.temperature is -1.0"),
        "ranks": (dict(meta={schema.KEY_ADAPTER_RANKS: [R - 4, 5]}), f"expected [n_in, {R + 1}] and [{R + 1}, n_out]"),
    }
    out = tmp_path / "out.gguf"
    for case, (kw, message) in cases.items():
        bad = tmp_path / f"{case}.gguf"
        rewrite_flow(good, bad, **kw)
        for args in (["inspect", str(bad)], ["export-lora", str(bad), "--adapter", "big", "-o", str(out)]):
            res = CliRunner().invoke(cli, args)
            assert res.exit_code == 1, (case, res.output)
            assert message in res.stderr, (case, res.stderr)
            assert "Traceback" not in res.output
            assert not out.exists()
    # the unmodified copy reads fine: the cases above fail for their own reason only
    res = CliRunner().invoke(cli, ["inspect", str(rewrite_flow(good, tmp_path / "copy.gguf"))])
    assert res.exit_code == 0, res.output


def test_one_line_for_the_f16_fallback_and_v_anywhere(llama, round_trip, tmp_path):
    """Q8_0 rows that do not fill whole blocks go in as F16, said in one line, not one per
    tensor; -v works after the subcommand as before it; --version answers."""
    import subprocess
    import sys

    d, R, adapters, gate = round_trip
    exe = [sys.executable, "-c", "from loraflow.converter.cli import main; main()"]
    args = ["flow", "--base", str(llama.gguf), "--gate", str(gate), *sum((["--adapter", f"{n}={p}"] for n, p in adapters), [])]
    quiet = subprocess.run(exe + args + ["-o", str(tmp_path / "a.gguf")], capture_output=True, text=True)
    assert quiet.returncode == 0, quiet.stderr
    lines = [line for line in quiet.stderr.splitlines() if "F16" in line]
    if R % 32:                                   # B's rows are R long
        assert len(lines) == 1 and "written as F16 instead of Q8_0" in lines[0], quiet.stderr
    else:
        assert lines == [], quiet.stderr
    for verbose in (["-v"] + args, args + ["-v"]):
        out = tmp_path / f"v{len(verbose)}-{verbose.index('-v')}.gguf"
        res = subprocess.run(exe + verbose + ["-o", str(out)], capture_output=True, text=True)
        assert res.returncode == 0 and f"wrote {out}" in res.stderr, res.stderr
    version = subprocess.run(exe + ["--version"], capture_output=True, text=True)
    assert version.returncode == 0 and "version" in version.stdout
