"""train-gate's default learning rate does not depend on the model's residual scale.

The gates train on each layer's input divided by its measured RMS (FlowGate.input_scale); the
checkpoint holds W itself. Two checks on a tiny random model (residual RMS 0.05 and 0.15, 100x
below SmolLM2's) with a planted token-dependent gate (tests/gate_task.py): with defaults only,
train-gate closes the loss gap between the best static fusion and the planted gate (107%
measured; before the inputs were scaled, the default lr 1e-3 closed 1% of it and --lr 3e-2
74%); and the same model with a 100x larger residual stream trains to the same gates.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from gate_task import make_planted_task, residual_scaled_copy  # noqa: E402

from loraflow.cli import main  # noqa: E402

COMMON = ["--no-eos", "--threads", "1", "-q"]       # train-gate's defaults otherwise


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    torch.set_num_threads(1)
    return make_planted_task(tmp_path_factory.mktemp("planted"))


def train(task, out, *args, model=None, loras=None) -> dict:
    adapters = [a for n, p in (loras or task["loras"]) for a in ("--adapter", f"{n}={p}")]
    result = CliRunner().invoke(main, ["train-gate", "--base", str(model or task["model"]), *adapters,
                                       "--data", str(task["train"]), "--dev", str(task["dev"]), "-o", str(out),
                                       *COMMON, *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((out / "run.json").read_text())


def test_defaults_close_the_gap_to_a_planted_gate(planted, tmp_path):
    from loraflow.gate_training.data import load_examples
    from loraflow.gate_training.load import load_flow_model, load_tokenizer
    from loraflow.gate_training.train import evaluate_loss

    tok = load_tokenizer(planted["model"])
    test = load_examples(planted["test"], tok, 512, add_eos=False)
    flow = load_flow_model(planted["model"], planted["loras"])

    def loss():
        return evaluate_loss(flow, test, 32, "cpu", tok.pad_token_id)

    flow.load_gate(planted["planted"])
    planted_loss = loss()
    static = {}                                  # the best static fusion: a grid, and the learned one
    for a in np.linspace(-0.5, 1.5, 9):
        flow.set_mode("static", [a, 1 - a])
        static[f"grid {a:.2f}"] = loss()
    learned = train(planted, tmp_path / "static", "--fusion", "static")["static_weights"]
    flow.set_mode("static", learned)
    static["learned"] = loss()
    best_static = min(static.values())
    run = train(planted, tmp_path / "dynamic")
    flow.set_mode("dynamic")
    flow.load_gate(tmp_path / "dynamic")
    trained = loss()
    closed = (best_static - trained) / (best_static - planted_loss)
    print(f"\ntest loss: planted gate {planted_loss:.4f}, best static {best_static:.4f} "
          f"({min(static, key=static.get)}), trained gate (defaults) {trained:.4f}: {closed:.0%} of the gap closed; "
          f"input scales {run['input_scales']}")
    assert best_static - planted_loss > 0.2            # the planted gate is worth learning
    assert max(run["input_scales"]) < 0.5              # a residual stream far below a real model's
    assert closed > 0.8


def test_training_does_not_depend_on_the_residual_scale(planted, tmp_path):
    """A 100x larger residual stream: the measured scales 100x, the gate W 1/100x, the losses equal."""
    model, loras = residual_scaled_copy(planted["model"], planted["loras"], 100.0, tmp_path / "x100")
    runs = {"x1": train(planted, tmp_path / "gate-x1", "--epochs", 2),
            "x100": train(planted, tmp_path / "gate-x100", "--epochs", 2, model=model, loras=loras)}
    scales = {k: np.array(r["input_scales"]) for k, r in runs.items()}
    dev = {k: [e["dev_loss"] for e in r["epochs"]] for k, r in runs.items()}
    print(f"\ninput scales {runs['x1']['input_scales']} and {runs['x100']['input_scales']}; dev loss per epoch {dev}")
    np.testing.assert_allclose(scales["x100"], 100 * scales["x1"], rtol=1e-3)
    assert dev["x1"][-1] < dev["x1"][0] - 0.1                  # it did train
    np.testing.assert_allclose(dev["x100"], dev["x1"], rtol=2e-3)
    from safetensors.numpy import load_file

    w1, w100 = (load_file(str(tmp_path / f"gate-{k}" / "gate.safetensors")) for k in ("x1", "x100"))
    for key in w1:
        factor = 1.0 if key.endswith("bias") else 100.0        # W acts on x: 100x the input, 1/100 the W
        np.testing.assert_allclose(w100[key] * factor, w1[key], rtol=0, atol=2e-3 * np.abs(w1[key]).max())
