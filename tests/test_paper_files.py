"""The paper's released files as they are, at tiny scale (thunlp/LoRAFlow, huggingface.co/Bowen232/LoRA-Flow):
PEFT LoRAs saved as fp16 `adapter_model.bin` with r = 64 and alpha = 16 (language LoRA in slot 0,
task LoRA in slot 1), gates as torch files with `encoder.layers.{i}.lora_fusion_gate.weight` and
`encoder.layers.{i}.weight_bias` in fp16, inference temperature 1.1 (their zh/ru math gates); and
the authors' sample `gate.pt`, whose keys sit under the model's own prefix and which has no
weight_bias. Converted by `loraflow-convert flow`, run by the runtime, compared with the
PyTorch model loading the same files."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from fixtures import make_tiny_lora  # noqa: E402
from parity_setup import RUNTIME, TOL, rel_err, torch_logits  # noqa: E402

from loraflow import schema  # noqa: E402
from loraflow.converter.cli import main as cli  # noqa: E402
from loraflow.converter.gates import read_gate  # noqa: E402


def as_released_lora(src, dst):
    """A PEFT folder as the authors released theirs: fp16 tensors in adapter_model.bin."""
    from safetensors.torch import load_file

    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    state = {k: v.half() for k, v in load_file(str(src / "adapter_model.safetensors")).items()}
    torch.save(state, dst / "adapter_model.bin")
    return dst


@pytest.fixture(scope="module")
def released(tiny_models, tmp_path_factory):
    tm = tiny_models.get("llama")
    d = tmp_path_factory.mktemp("paper")
    loras = {name: as_released_lora(make_tiny_lora(tm.hf_dir, d / f"{name}-st", r=64, alpha=16, seed=seed),
                                    d / f"{name}_lora")
             for seed, name in ((1, "zh"), (2, "math"))}
    rng = np.random.default_rng(4)
    gate, sample = {}, {}
    for i in range(tm.n_layer):
        w = torch.tensor(rng.normal(0, 3.0, (2, tm.n_embd)), dtype=torch.float16)
        gate[schema.PAPER_GATE_WEIGHT.format(i=i)] = w
        gate[schema.PAPER_GATE_BIAS.format(i=i)] = torch.tensor([[-0.4, 0.3]], dtype=torch.float16)
        sample[f"base_model.model.model.layers.{i}.lora_fusion_gate.weight"] = w
    torch.save(gate, d / "zh_math.pt")
    torch.save(sample, d / "gate.pt")
    return tm, d, loras


def convert(tm, d, loras, gate, out, *extra):
    """`loraflow-convert flow` with F32 LoRA tensors (the tests compare with PyTorch's F32 model)."""
    args = ["flow", "--base", str(tm.gguf), "--adapter", f"zh={loras['zh']}", "--adapter", f"math={loras['math']}",
            "--gate", str(gate), "-o", str(d / out), "--outtype", "f32", *extra]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    return d / out, res


def test_released_gate_and_loras_match_torch(released):
    from transformers import AutoModelForCausalLM

    from loraflow.gate_training.model import FlowModel
    from loraflow.peft_io import read_peft_adapter
    from loraflow.runtime import FlowLlama

    tm, d, loras = released
    flow, _ = convert(tm, d, loras, d / "zh_math.pt", "zh_math.flow.gguf", "--temperature", "1.1")
    adapters = [read_peft_adapter(loras[n]) for n in ("zh", "math")]
    assert [(a.r, a.alpha) for a in adapters] == [(64, 16.0)] * 2
    hf = AutoModelForCausalLM.from_pretrained(str(tm.hf_dir), dtype=torch.float32)
    model = FlowModel(hf, adapters, ["zh", "math"], temperature=1.1)
    model.load_paper_gate(d / "zh_math.pt")
    tokens = np.random.default_rng(0).integers(10, 2000, 48).tolist()
    ref = torch_logits(model, tokens)
    llm = FlowLlama(str(tm.gguf), flow_path=str(flow), record_gates=True, **RUNTIME)
    try:
        ours = llm.eval_logits(tokens)
        weights = llm.gate_weights()
    finally:
        llm.close()
    assert rel_err(ours, ref) < TOL
    assert weights.std(axis=0).mean() > 0.01  # the released gate really varies per token
    model.set_mode("off")
    assert rel_err(torch_logits(model, tokens), ref) > 1e-2  # and the LoRAs matter


def test_sample_gate_without_bias_gets_the_reference_start(released, caplog):
    tm, d, loras = released
    with caplog.at_level(logging.WARNING, logger="loraflow.converter"):
        g = read_gate(d / "gate.pt")
    assert "no weight_bias in the gate file; using the reference's initial bias [-0.5, 0.5]" in caplog.text
    assert all(np.array_equal(b, [-0.5, 0.5]) for b in g.biases) and g.n_layer == tm.n_layer
    flow, _ = convert(tm, d, loras, d / "gate.pt", "sample.flow.gguf")
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(flow), "--json"]).stdout)
    assert [row["bias"] for row in info["gates"]] == [[-0.5, 0.5]] * tm.n_layer
