"""`loraflow-convert export-lora`: one adapter of a flow file back out as a stock llama.cpp LoRA.

Interop, on tiny llama (q/k rows permuted by llama.cpp) and qwen3 models with three LoRAs of
unequal ranks (one rsLoRA, two covering only some modules or layers):
- the exported file holds the same tensors, names and types as llama.cpp's own
  convert_lora_to_gguf.py makes from the PEFT folder, and alpha / r equals the PEFT scale;
- stock llama.cpp (llama_cpp.Llama(lora_path=exported)) gives the logits of the runtime's
  single:NAME mode;
- from f16 and q8_0 flow files the export is within those types' error bounds;
- every refusal: message, exit code, no output file.
"""

from __future__ import annotations

import math
import subprocess
import sys

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from fixtures import make_random_gate, make_tiny_loras
from loraflow.converter.cli import main as cli
from loraflow.converter.flow import convert_flow
from loraflow.gguf_read import read_header
from loraflow.llama_source import llama_cpp_source_dir

# name -> (rank, alpha, targets, rsLoRA, layers)
LORAS = {
    "lang": (8, 16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), False, None),
    "math": (4, 4, ("q_proj", "k_proj", "v_proj", "down_proj"), True, [0]),
    "code": (6, 12, ("o_proj", "up_proj"), False, None),
}
NAMES = list(LORAS)
N_TOKENS = 48
RUNTIME = dict(n_ctx=64, n_batch=N_TOKENS, n_ubatch=N_TOKENS, n_threads=2, logits_all=True, flash_attn=False,
               type_k=0, type_v=0, verbose=False)  # F32 KV cache


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def setup(request, tiny_models, tmp_path_factory):
    tm = tiny_models.get(request.param)
    work = tmp_path_factory.mktemp(f"export-{tm.arch}")
    peft = make_tiny_loras(tm.hf_dir, work, LORAS)
    gate = make_random_gate(tm.n_layer, 3, tm.n_embd, work / "gate", NAMES, seed=4, w_std=0.2)
    flows = {t: convert_flow(tm.gguf, [(n, peft[n]) for n in NAMES], gate, work / f"flow-{t}.gguf", outtype=t)
             for t in ("f32", "f16", "q8_0")}
    return dict(tm=tm, work=work, peft=peft, flows=flows)


def stock_convert(setup, name, outtype="f32"):
    """The PEFT folder converted by llama.cpp's convert_lora_to_gguf.py."""
    out = setup["work"] / f"stock-{name}-{outtype}.gguf"
    if not out.exists():
        script = llama_cpp_source_dir() / "convert_lora_to_gguf.py"
        subprocess.run([sys.executable, str(script), "--base", str(setup["tm"].hf_dir), "--outtype", outtype,
                        "--outfile", str(out), str(setup["peft"][name])], check=True, capture_output=True)
    return out


def export(flow, name, out, *extra):
    res = CliRunner().invoke(cli, ["export-lora", str(flow), "--adapter", name, "-o", str(out), *extra])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(out)
    return out


def lora_tensors(path):
    h = read_header(path)
    return h, {name: (t.type, h.read(name)) for name, t in h.tensors.items()}


def peft_scale(name):
    r, alpha, _, rslora, _ = LORAS[name]
    return alpha / math.sqrt(r) if rslora else alpha / r


@pytest.mark.parametrize("name", NAMES)
def test_export_holds_what_llama_cpp_converter_writes(setup, name):
    ours_h, ours = lora_tensors(export(setup["flows"]["f32"], name, setup["work"] / f"ours-{name}.gguf"))
    stock_h, stock = lora_tensors(stock_convert(setup, name))
    for key in ("general.architecture", "general.type", "adapter.type"):
        assert ours_h.meta[key] == stock_h.meta[key], key
    assert ours_h.meta["adapter.type"] == "lora" and ours_h.meta["general.type"] == "adapter"
    assert ours_h.types["adapter.lora.alpha"] == stock_h.types["adapter.lora.alpha"] == (gguf.GGUFValueType.FLOAT32,)
    r, alpha, _, rslora, _ = LORAS[name]
    # llama.cpp scales a pair by alpha / r: ours gives the PEFT scale (rsLoRA included) ...
    assert ours_h.meta["adapter.lora.alpha"] / r == pytest.approx(peft_scale(name), rel=1e-6)
    # ... stock's is alpha / r whatever use_rslora says (the parity tests pass lora_scale=sqrt(r) for it)
    assert stock_h.meta["adapter.lora.alpha"] == alpha
    assert set(ours) == set(stock), "the same tensors: the modules the adapter covers, and only those"
    assert all(n.endswith((".weight.lora_a", ".weight.lora_b")) for n in ours)
    for tname, (qtype, want) in stock.items():
        got_type, got = ours[tname]
        assert got_type == qtype == gguf.GGMLQuantizationType.F32, tname
        assert got.shape == want.shape, tname
        assert list(ours_h.tensors[tname].shape) == list(stock_h.tensors[tname].shape)
        # lora_a is copied; lora_b is (s * B) / s in float32: a rounding step at most
        np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-12 * np.abs(want).max(), err_msg=tname)
    n_pairs = len(ours) // 2
    _, _, targets, _, layers = LORAS[name]
    assert n_pairs == len(targets) * (len(layers) if layers else setup["tm"].n_layer)


@pytest.mark.parametrize("name", NAMES)
def test_stock_llama_cpp_on_export_matches_single_mode(setup, name):
    import llama_cpp

    from loraflow.runtime import FlowLlama

    tm = setup["tm"]
    tokens = np.random.default_rng(0).integers(10, 40000, N_TOKENS).tolist()
    exported = setup["work"] / f"ours-{name}.gguf"
    if not exported.exists():
        export(setup["flows"]["f32"], name, exported)
    stock = llama_cpp.Llama(str(tm.gguf), lora_path=str(exported), **RUNTIME)
    stock.eval(tokens)
    ref = np.array(stock.scores[:N_TOKENS], dtype=np.float32)
    stock.close()
    llm = FlowLlama(str(tm.gguf), flow_path=str(setup["flows"]["f32"]), mode=f"single:{name}", **RUNTIME)
    ours = llm.eval_logits(tokens)
    llm.set_mode("off")
    base = llm.eval_logits(tokens)
    llm.close()
    scale = np.abs(ref).max()
    print(f"{tm.arch} {name}: stock llama.cpp on the export vs single:{name}: max |diff| / max |logit| = "
          f"{np.abs(ours - ref).max() / scale:.2e}; LoRA effect {np.abs(base - ref).max() / scale:.2e}")
    assert np.abs(ours - ref).max() < 1e-3 * scale
    assert np.abs(base - ref).max() > 1e-2 * scale, "the LoRA should visibly change the logits"


@pytest.mark.parametrize("flow_type", ["f16", "q8_0"])
def test_export_from_f16_and_q8_0_flow_files(setup, flow_type):
    """The export dequantizes the flow tensors; against the PEFT values it is off by the flow
    file's own error (half an f16 ulp; Q8_0: half a step of amax/127 per block of 32, F16 where
    rows do not fill blocks) plus the export's own f16 rounding."""
    flow = setup["flows"][flow_type]
    flow_h = read_header(flow)
    for name in NAMES:
        stock_h, stock = lora_tensors(stock_convert(setup, name))
        for outtype in ("f32", "f16"):
            out = export(flow, name, setup["work"] / f"ours-{name}-{flow_type}-{outtype}.gguf", "--outtype", outtype)
            ours_h, ours = lora_tensors(out)
            assert set(ours) == set(stock)
            for tname, (_, want) in stock.items():
                got_type, got = ours[tname]
                assert got_type.name == outtype.upper()
                # the flow tensor this came from: lora_a <- flow_a rows, lora_b <- flow_b columns
                module = tname.split(".")[2]
                half = "flow_a" if tname.endswith("lora_a") else "flow_b"
                src_type = flow_h.tensors[f"blk.{tname.split('.')[1]}.{module}.{half}"].type.name
                if src_type == "F16":
                    bound = np.abs(want) * 2.0 ** -11
                else:  # Q8_0 blocks along the flow tensor's rows: lora_a rows are flow_a rows
                    assert src_type == "Q8_0" and half == "flow_a"
                    amax = np.abs(want).reshape(want.shape[0], -1, 32).max(-1, keepdims=True)
                    bound = np.broadcast_to(amax * (0.5 / 127 + 2.0 ** -10), (*amax.shape[:2], 32)).reshape(want.shape)
                if outtype == "f16":
                    bound = bound + np.abs(want) * 2.0 ** -10
                err = np.abs(got - want)
                assert np.all(err <= bound + 2.0 ** -24), (tname, float(err.max()))


def test_inspect_the_export(setup):
    name = "math"
    out = setup["work"] / f"ours-{name}.gguf"
    if not out.exists():
        export(setup["flows"]["f32"], name, out)
    res = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert res.exit_code == 0, res.output
    import json

    d = json.loads(res.stdout)
    assert d["kind"] == "lora" and d["name"] == name and d["ranks"] == [4]
    assert d["alpha"] == pytest.approx(4 * peft_scale(name))
    assert d["modules"] == {"0": ["attn_q", "attn_k", "attn_v", "ffn_down"]}
    text = CliRunner().invoke(cli, ["inspect", str(out)]).stdout
    assert "stock llama.cpp LoRA" in text and "layer 0: attn_q attn_k attn_v ffn_down" in text


# ---- refusals -------------------------------------------------------------------------------

def refused(args, match, out, exit_code=1):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == exit_code, res.output
    assert match in res.stderr, res.stderr
    assert "Traceback" not in res.output
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def test_export_refusals(setup, tmp_path):
    flow = setup["flows"]["f32"]
    out = tmp_path / "x.gguf"
    refused(["export-lora", str(flow), "--adapter", "nope", "-o", str(out)],
            "no adapter named 'nope'; the adapters are ['lang', 'math', 'code']", out)
    refused(["export-lora", str(setup["tm"].gguf), "--adapter", "lang", "-o", str(out)],
            "not a LoRA-Flow file (expected general.type='adapter' and adapter.type='lora_flow'): "
            "a base model GGUF", out)
    refused(["export-lora", str(stock_convert(setup, "lang")), "--adapter", "lang", "-o", str(out)],
            "a stock llama.cpp LoRA, not a LoRA-Flow file", out)
    refused(["export-lora", str(flow), "--adapter", "lang", "-o", str(out), "--outtype", "q8_0"],
            "Invalid value for '--outtype'", out, exit_code=2)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 8)
    refused(["export-lora", str(junk), "--adapter", "lang", "-o", str(out)], "truncated or corrupt GGUF header", out)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(flow.read_bytes()[:-100])
    refused(["export-lora", str(cut), "--adapter", "lang", "-o", str(out)], "lies beyond the end of the file", out)
    # the flow file itself, even with --force
    before = flow.read_bytes()
    res = CliRunner().invoke(cli, ["export-lora", str(flow), "--adapter", "lang", "-o", str(flow), "--force"])
    assert res.exit_code == 1 and "would overwrite the input" in res.stderr
    assert flow.read_bytes() == before
    # an existing output is kept without --force, replaced with it
    out.write_bytes(b"precious")
    res = CliRunner().invoke(cli, ["export-lora", str(flow), "--adapter", "lang", "-o", str(out)])
    assert res.exit_code == 1 and "already exists; pass --force" in res.stderr
    assert out.read_bytes() == b"precious"
    res = CliRunner().invoke(cli, ["export-lora", str(flow), "--adapter", "lang", "-o", str(out), "--force"])
    assert res.exit_code == 0 and read_header(out).meta["adapter.type"] == "lora"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "junk.gguf", "x.gguf"]
