"""`loraflow-convert base` on a tiny llama: every --outtype, straight from llama.cpp's converter
(f32, f16, bf16, q8_0) or through an f32 temporary file and llama.cpp's quantize API (q4_0,
q4_1, q4_k_m, q5_k_m, q6_k); each result loads in the runtime with a flow file; progress is
shown unless --quiet; temporary files never stay behind; refusals have messages and exit codes.
(The tiny model's rows of 64 do not fill k-quant blocks, so llama.cpp falls back to other types
there; test_smollm2_base checks real Q4_K tensors.)"""

from __future__ import annotations

import logging
import os

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from fixtures import make_random_gate, make_tiny_lora
from loraflow.converter import base as base_mod
from loraflow.converter.base import quantize_gguf
from loraflow.converter.cli import main as cli
from loraflow.converter.flow import convert_flow
from loraflow.converter.summary import inspect_gguf
from loraflow.errors import ConversionError
from loraflow.gguf_read import read_header

FT = gguf.LlamaFileType
FILE_TYPES = {"f32": FT.ALL_F32, "f16": FT.MOSTLY_F16, "bf16": FT.MOSTLY_BF16, "q8_0": FT.MOSTLY_Q8_0,
              "q4_0": FT.MOSTLY_Q4_0, "q4_1": FT.MOSTLY_Q4_1, "q4_k_m": FT.MOSTLY_Q4_K_M,
              "q5_k_m": FT.MOSTLY_Q5_K_M, "q6_k": FT.MOSTLY_Q6_K}
# the type of the big projection matrices in the result (after llama.cpp's fall-backs for rows of 64)
MATRIX_TYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    tm = tiny_models.get("llama")
    work = tmp_path_factory.mktemp("base")
    lora = make_tiny_lora(tm.hf_dir, work / "a", r=8, alpha=16, seed=1)
    gate = make_random_gate(tm.n_layer, 1, tm.n_embd, work / "g", ["a"], seed=2, w_std=0.2)
    flow = convert_flow(tm.hf_dir, [("a", lora)], gate, work / "flow.gguf", outtype="f16")
    return tm, work, flow


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# the whole command for these; the other quantized types through the same quantize_gguf call the
# command makes after converting (saves a converter run each: the file stays under two minutes)
THROUGH_CLI = ("f16", "bf16", "q8_0", "q4_k_m")


@pytest.mark.parametrize("outtype", list(FILE_TYPES))
def test_every_outtype_converts_and_runs(setup, outtype):
    from loraflow.runtime import FlowLlama

    tm, work, flow = setup
    out_dir = work / outtype
    out_dir.mkdir()
    out = out_dir / "model.gguf"
    if outtype == "f32":
        out = tm.gguf  # the fixture made it with convert_base
    elif outtype in THROUGH_CLI:
        res = CliRunner().invoke(cli, ["base", str(tm.hf_dir), "-o", str(out), "--outtype", outtype])
        assert res.exit_code == 0, res.output
        assert res.stdout.strip() == str(out)
        assert "Model successfully exported" in res.stderr  # the converter's own progress, streamed
        if outtype in base_mod.QUANTIZE_FTYPES:
            assert f"quantizing to {outtype}" in res.stderr and "20/20" in res.stderr  # the progress bar
        assert leftovers(out_dir) == []
        umask = os.umask(0o022)
        os.umask(umask)
        assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file's mode, not mkstemp's 0600
    else:
        quantize_gguf(tm.gguf, out, outtype)

    h = read_header(out)
    assert h.meta["general.file_type"] == FILE_TYPES[outtype]
    info = inspect_gguf(out)
    assert info["kind"] == "model" and info["file_type"] == FILE_TYPES[outtype].name
    assert (info["n_layer"], info["n_embd"], info["vocab_size"]) == (2, 64, 49152)
    types = {t.name: t.type.name for t in h.tensors.values()}
    if outtype in MATRIX_TYPE:
        assert types["blk.0.ffn_up.weight"] == MATRIX_TYPE[outtype]
    else:
        assert types["blk.0.ffn_up.weight"] not in ("F32", "F16")  # quantized, to a fall-back type
    assert types["blk.0.attn_norm.weight"] == "F32"

    tokens = list(range(1000, 1032))
    kw = dict(n_ctx=64, n_batch=32, n_ubatch=32, n_threads=2, logits_all=True, verbose=False)
    llm = FlowLlama(str(out), flow_path=str(flow), mode="dynamic", **kw)
    logits = llm.eval_logits(tokens)
    llm.set_mode("off")
    base_logits = llm.eval_logits(tokens)
    llm.close()
    assert np.isfinite(logits).all() and np.abs(logits - base_logits).max() > 1e-3
    ref = FlowLlama(str(tm.gguf), flow_path=str(flow), mode="dynamic", **kw)
    ref_logits = ref.eval_logits(tokens)
    ref.close()
    # a sanity bound only (tiny random models are hard to quantize); SmolLM2 measures agreement
    err = np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()
    assert err < {"f32": 1e-5, "f16": 1e-2, "bf16": 3e-2, "q8_0": 3e-2}.get(outtype, 0.5), err


def test_quiet_and_fallback_warning(setup, tmp_path, caplog):
    tm, _, _ = setup
    out = tmp_path / "q.gguf"
    with caplog.at_level(logging.INFO, logger="loraflow.converter"):
        res = CliRunner().invoke(cli, ["base", str(tm.hf_dir), "-o", str(out), "--outtype", "q6_k", "-q"])
    assert res.exit_code == 0, res.output
    assert "Model successfully exported" not in res.stderr and "quantizing" not in res.stderr
    # rows of 64 do not fit a k-quant block of 256: llama.cpp's fall-back, named per tensor at
    # INFO (-v) and summed up once as a warning
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["llama.cpp: WARNING: 14 of 20 tensor(s) required fallback quantization"]
    assert any("blk.0.attn_q.weight" in r.getMessage() and "falling back" in r.getMessage()
               for r in caplog.records if r.levelno == logging.INFO)


def test_quantization_failure_leaves_nothing(setup, tmp_path, monkeypatch):
    tm, _, _ = setup

    def broken_converter(script, hf_dir, out, outtype, progress):
        out.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    monkeypatch.setattr(base_mod, "_run_converter", broken_converter)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    res = CliRunner().invoke(cli, ["base", str(tm.hf_dir), "-o", str(out_dir / "b.gguf"), "--outtype", "q4_1"])
    assert res.exit_code == 1, res.output
    assert "error: llama.cpp could not quantize" in res.stderr and "to q4_1" in res.stderr
    assert "failed to quantize" in res.stderr  # llama.cpp's own reason, captured from its log
    assert "Traceback" not in res.output
    assert list(out_dir.iterdir()) == []  # neither the output nor the f32 intermediate

    with pytest.raises(ConversionError, match="quantization type 'q3_k' is not one of"):
        quantize_gguf(tm.gguf, tmp_path / "x.gguf", "q3_k")
    with pytest.raises(ConversionError, match="no such GGUF file to quantize"):
        quantize_gguf(tmp_path / "missing.gguf", tmp_path / "x.gguf", "q4_0")


def test_llama_log_is_given_back(setup, tmp_path, monkeypatch):
    """Quantizing captures llama.cpp's log, then hands it back to llama-cpp-python's callback,
    also when quantizing fails."""
    import llama_cpp
    from llama_cpp import _logger

    tm, _, _ = setup
    calls = []
    real = llama_cpp.llama_log_set

    def recording(callback, user_data):
        calls.append(callback)
        return real(callback, user_data)
    monkeypatch.setattr(llama_cpp, "llama_log_set", recording)
    quantize_gguf(tm.gguf, tmp_path / "q.gguf", "q4_0")
    assert len(calls) == 2 and calls[0] is not _logger.llama_log_callback
    assert calls[-1] is _logger.llama_log_callback
    (tmp_path / "junk.gguf").write_bytes(b"junk")
    with pytest.raises(ConversionError, match="could not quantize"):
        quantize_gguf(tmp_path / "junk.gguf", tmp_path / "q2.gguf", "q4_0")
    assert len(calls) == 4 and calls[-1] is _logger.llama_log_callback


def test_base_refusals(setup, tmp_path):
    import json
    import shutil

    tm, _, _ = setup
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "b.gguf"

    def refused(args, message, exit_code=1):
        res = CliRunner().invoke(cli, ["base", *args])
        assert res.exit_code == exit_code, res.output
        assert message in res.stderr, res.stderr
        assert "Traceback" not in res.output
        assert list(out_dir.iterdir()) == []

    refused([str(tm.hf_dir), "-o", str(out), "--outtype", "q3_k_s"], "Invalid value for '--outtype'", exit_code=2)
    mamba = tmp_path / "mamba"  # a recurrent model: llama.cpp runs it, LoRA-Flow does not
    mamba.mkdir()
    cfg = json.loads((tm.hf_dir / "config.json").read_text())
    (mamba / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    refused([str(mamba), "-o", str(out), "--outtype", "q4_k_m"],
            "architecture 'mamba' is recurrent or hybrid (state-space, RWKV or convolution layers): "
            "LoRA-Flow supports decoder-only transformer stacks only")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused([str(empty), "-o", str(out)], "no config.json; not a Hugging Face model folder")
    # never over an input, even with --force
    copy = tmp_path / "copy"
    shutil.copytree(tm.hf_dir, copy)
    before = (copy / "model.safetensors").read_bytes()
    res = CliRunner().invoke(cli, ["base", str(copy), "-o", str(copy / "model.safetensors"), "--force"])
    assert res.exit_code == 1 and "would overwrite the input" in res.stderr
    assert (copy / "model.safetensors").read_bytes() == before
    # an existing output stays without --force
    out.write_bytes(b"precious")
    res = CliRunner().invoke(cli, ["base", str(tm.hf_dir), "-o", str(out), "--outtype", "q4_0"])
    assert res.exit_code == 1 and "already exists; pass --force" in res.stderr
    assert out.read_bytes() == b"precious" and leftovers(out_dir) == []
    res = CliRunner().invoke(cli, ["base", str(tm.hf_dir), "-o", str(out), "--outtype", "q4_0", "--force", "-q"])
    assert res.exit_code == 0 and read_header(out).meta["general.file_type"] == FT.MOSTLY_Q4_0
    assert leftovers(out_dir) == []


def test_lossless_intermediate(tmp_path):
    """Before quantizing, the converter writes the weights in their own float type: nothing rounded."""
    import torch
    from safetensors.torch import save_file

    cases = {"f16": [torch.float16], "bf16": [torch.bfloat16], "f32": [torch.float32],
             "mixed": [torch.float16, torch.bfloat16], "f16+int": [torch.float16, torch.int64]}
    want = {"f16": "f16", "bf16": "bf16", "f32": "f32", "mixed": "f32", "f16+int": "f16"}
    for name, dtypes in cases.items():
        d = tmp_path / name
        d.mkdir()
        for i, dtype in enumerate(dtypes):
            save_file({f"t{i}": torch.zeros(4, 4, dtype=dtype)}, str(d / f"model-{i}.safetensors"))
        assert base_mod._lossless_intermediate(d) == want[name], name
    assert base_mod._lossless_intermediate(tmp_path) == "f32"  # no safetensors (a .bin model)
