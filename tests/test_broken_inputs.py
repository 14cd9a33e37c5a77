"""Converter and trainer inputs gone wrong, beyond what test_converter.py, test_convert_flow_cli.py
and test_gate_data.py check: a disk that fills up while an output is written (a process whose file
size limit, RLIMIT_FSIZE, is smaller than the output: writes past it fail with EFBIG, as on a full
disk), an adapter folder with a broken adapter_config.json, a gate file that is not safetensors,
missing inputs and adapters made for another base model given to train-gate. Every case: `error:`
and exit code 1, no traceback, no output or temporary file left, inputs untouched."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

pytest.importorskip("torch")

from tiny_flow import build_tiny_flow  # noqa: E402

BIN = Path(sys.executable).parent


def limit_file_size(n_bytes: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
    return preexec


def run(args, fsize=None):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"),
                          preexec_fn=limit_file_size(fsize) if fsize else None)


def digest(paths) -> dict:
    out = {}
    for p in map(Path, paths):
        for f in sorted(p.rglob("*") if p.is_dir() else [p]):
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def refused(res, *fragments):
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "error: " in res.stderr and "Traceback" not in res.stderr + res.stdout, res.stderr
    for f in fragments:
        assert f in res.stderr, (f, res.stderr)


@pytest.fixture(scope="module")
def inputs(tiny_models, tmp_path_factory):
    tm = tiny_models.get("llama")
    work = tmp_path_factory.mktemp("broken-inputs")
    flow = build_tiny_flow(tm, work)
    adapters = [f"lang={work / 'lora-lang'}", f"math={work / 'lora-math'}"]
    return dict(tm=tm, work=work, flow=flow, adapters=adapters, gate=work / "gate" / "gate.safetensors")


def flow_args(s, out, adapters=None, gate=None):
    args = [BIN / "loraflow-convert", "flow", "--base", s["tm"].gguf, "--gate", gate or s["gate"], "-o", out]
    for a in adapters or s["adapters"]:
        args += ["--adapter", a]
    return args


def test_convert_flow_disk_full(inputs, tmp_path):
    s = inputs
    before = digest([s["tm"].gguf, s["work"] / "lora-lang", s["work"] / "lora-math", s["gate"]])
    out = tmp_path / "out" / "flow.gguf"
    out.parent.mkdir()
    assert s["flow"].stat().st_size > 32 << 10  # the output does not fit under the limit below
    res = run(flow_args(s, out), fsize=16 << 10)
    refused(res, str(out), "not written", "is the disk full?")
    assert list(out.parent.iterdir()) == []
    assert digest([s["tm"].gguf, s["work"] / "lora-lang", s["work"] / "lora-math", s["gate"]]) == before
    # with room to write, the same command works
    res = run(flow_args(s, out))
    assert res.returncode == 0, res.stderr
    assert [p.name for p in out.parent.iterdir()] == ["flow.gguf"]


def test_convert_flow_disk_full_keeps_existing_output(inputs, tmp_path):
    """--force over an existing file: on failure the old file is still there, whole."""
    s = inputs
    out = tmp_path / "flow.gguf"
    out.write_bytes(b"the previous output")
    res = run([*flow_args(s, out), "--force"], fsize=16 << 10)
    refused(res, "not written")
    assert out.read_bytes() == b"the previous output"
    assert [p.name for p in tmp_path.iterdir()] == ["flow.gguf"]


def test_export_lora_disk_full(inputs, tmp_path):
    s = inputs
    before = digest([s["flow"]])
    out = tmp_path / "lang.gguf"
    res = run([BIN / "loraflow-convert", "export-lora", s["flow"], "--adapter", "lang", "-o", out], fsize=8 << 10)
    refused(res, str(out), "not written")
    assert list(tmp_path.iterdir()) == []
    assert digest([s["flow"]]) == before


def test_broken_adapter_config_and_gate(inputs, tmp_path):
    s = inputs
    bad_lora = tmp_path / "bad-lora"
    shutil.copytree(s["work"] / "lora-math", bad_lora)
    (bad_lora / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8, "target_modules": [')
    out = tmp_path / "out" / "flow.gguf"
    before = digest([bad_lora])
    refused(run(flow_args(s, out, adapters=[s["adapters"][0], f"math={bad_lora}"])), "adapter_config.json")
    assert digest([bad_lora]) == before
    no_config = tmp_path / "no-config"
    shutil.copytree(s["work"] / "lora-math", no_config)
    (no_config / "adapter_config.json").unlink()
    refused(run(flow_args(s, out, adapters=[s["adapters"][0], f"math={no_config}"])), "adapter_config.json")
    garbage = tmp_path / "gate.safetensors"
    garbage.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    refused(run(flow_args(s, out, gate=garbage)), str(garbage))
    garbage.write_text("not a gate at all")
    refused(run(flow_args(s, out, gate=garbage)), str(garbage))
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_train_gate_outputs_on_a_full_disk(tmp_path):
    """train-gate writes its outputs into a temporary folder and moves them into place: a write
    that fails (here a real EFBIG under a file size limit, in gate.safetensors or run.json) leaves
    none of the new outputs, and the previous run's outputs as they were."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text('{"previous": true}')
    script = f"""
import numpy as np, json, sys
from pathlib import Path
from safetensors.numpy import save_file
from loraflow.errors import LoraFlowError
from loraflow.gate_training.train import write_outputs
writers = {{
    "gate.safetensors": lambda p: save_file({{"w": np.zeros(1 << 16, np.float32)}}, str(p)),
    "run.json": lambda p: p.write_text(json.dumps({{"x": list(range(100000))}})),
}}
for order in (list(writers), list(writers)[::-1]):
    try:
        write_outputs(Path({str(out)!r}), {{n: writers[n] for n in order}})
    except LoraFlowError as e:
        print("error:", e)
    else:
        sys.exit("written")
"""
    res = run([sys.executable, "-c", script], fsize=64 << 10)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2 and all(f"{out}: could not write the outputs" in line for line in lines), res.stdout
    assert [p.name for p in out.iterdir()] == ["run.json"]
    assert json.loads((out / "run.json").read_text()) == {"previous": True}


def test_train_gate_missing_and_mismatched_inputs(inputs, tmp_path):
    s = inputs
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi.", "response": " hi there"}) + "\n")
    out = tmp_path / "out"

    def train(*adapters, data=data):
        args = [BIN / "loraflow", "train-gate", "--base", s["tm"].hf_dir, "--data", data, "-o", out, "-q",
                "--threads", "1", "--epochs", "1"]
        for a in adapters:
            args += ["--adapter", a]
        return run(args)

    res = train(s["adapters"][0], f"math={tmp_path / 'nowhere'}")
    assert res.returncode != 0 and "Traceback" not in res.stderr and "nowhere" in res.stderr, res.stderr
    res = train(*s["adapters"], data=tmp_path / "missing.jsonl")
    refused(res, "missing.jsonl")
    # a LoRA made for another base model: its q_proj reads 32 inputs where this base has 64
    foreign = tmp_path / "foreign"
    shutil.copytree(s["work"] / "lora-math", foreign)
    weights = load_file(str(foreign / "adapter_model.safetensors"))
    key = next(k for k in weights if "q_proj.lora_A" in k)
    weights[key] = np.ones((weights[key].shape[0], 32), np.float32)
    save_file(weights, str(foreign / "adapter_model.safetensors"))
    before = digest([foreign, s["tm"].hf_dir])
    res = train(s["adapters"][0], f"math={foreign}")
    assert res.returncode != 0 and "Traceback" not in res.stderr and "error" in res.stderr.lower(), res.stderr
    assert digest([foreign, s["tm"].hf_dir]) == before
    assert not out.exists() or list(out.iterdir()) == []
    flow_out = tmp_path / "flow.gguf"
    refused(run(flow_args(s, flow_out, adapters=[s["adapters"][0], f"math={foreign}"])), "q_proj")
    assert not flow_out.exists()
    assert digest([foreign, s["tm"].hf_dir]) == before
