"""`loraflow train-gate` learns what a per-token gate should, and `loraflow eval` gives the same
answers in PyTorch and in the runtime.

The task (tests/gate_task.py): a chain of words where kind-A words need LoRA "first" and kind-B
words LoRA "second"; each LoRA was trained on its own rule alone, the two rules contradict
each other on every word, and the kinds alternate within each sequence. The gates train with
train-gate's defaults (lr, epochs): the tiny model's residual stream (median RMS 0.05 at its
first layer) is 100x smaller than SmolLM2's, and the gates see it divided by its measured RMS.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from gate_task import make_task, make_task_model, train_rule_lora, write_jsonl  # noqa: E402

from loraflow.cli import main  # noqa: E402
from loraflow.gate_training.train import DEFAULT_LR  # noqa: E402

LENGTH = 10                      # response words per example
TRAIN = ["--no-eos", "--threads", "1", "-q"]      # train-gate's defaults otherwise


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def task_setup(tmp_path_factory):
    from transformers import AutoTokenizer

    torch.set_num_threads(1)     # two shared cores: one thread avoids oversubscription stalls
    work = tmp_path_factory.mktemp("gate-task")
    model = make_task_model(work / "model")
    task = make_task(AutoTokenizer.from_pretrained(str(model)))
    loras = {"first": train_rule_lora(model, task, task.F1, work / "lora-first", seed=1),
             "second": train_rule_lora(model, task, task.F2, work / "lora-second", seed=2)}
    files = {
        "train": write_jsonl(work / "train.jsonl", task.rows(task.T, 200, LENGTH, seed=7)),
        "dev": write_jsonl(work / "dev.jsonl", task.rows(task.T, 50, LENGTH, seed=8)),
        "test": write_jsonl(work / "test.jsonl", task.rows(task.T, 50, LENGTH, seed=9)),
        "first": write_jsonl(work / "rule-first.jsonl", task.rows(task.F1, 50, LENGTH, seed=10)),
        "second": write_jsonl(work / "rule-second.jsonl", task.rows(task.F2, 50, LENGTH, seed=11)),
    }
    adapter_args = ["--adapter", f"first={loras['first']}", "--adapter", f"second={loras['second']}"]
    runs = {}
    for run, fusion in (("dynamic", ["--fusion", "dynamic"]), ("static", ["--fusion", "static"]),
                        ("static-per-layer", ["--fusion", "static", "--per-layer"]), ("average", ["--fusion", "average"])):
        out = work / f"out-{run}"
        run_cli("train-gate", "--base", model, *adapter_args, "--data", files["train"], "--dev", files["dev"],
                "-o", out, *fusion, *TRAIN)
        runs[run] = out
    return dict(work=work, model=model, task=task, loras=loras, files=files, runs=runs, adapter_args=adapter_args)


def flow_model(s):
    from loraflow.gate_training.load import load_flow_model

    return load_flow_model(s["model"], [(n, s["loras"][n]) for n in ("first", "second")])


def held_out_loss(s, flow, name="test"):
    from loraflow.gate_training.data import load_examples
    from loraflow.gate_training.load import load_tokenizer
    from loraflow.gate_training.train import evaluate_loss

    tok = load_tokenizer(s["model"])
    return evaluate_loss(flow, load_examples(s["files"][name], tok, 512, add_eos=False), 16, "cpu", tok.pad_token_id)


def test_loras_each_learned_their_own_rule(task_setup):
    """The premise: each LoRA alone solves its rule and fails the other; neither solves the task."""
    flow = flow_model(task_setup)
    losses = {}
    for mode in ("single:first", "single:second"):
        flow.set_mode(mode)
        losses[mode] = {n: held_out_loss(task_setup, flow, n) for n in ("first", "second", "test")}
    print("\nheld-out loss of each LoRA alone:", json.dumps(losses, indent=1))
    assert losses["single:first"]["first"] < 0.1 and losses["single:second"]["second"] < 0.1
    assert losses["single:first"]["second"] > 3 and losses["single:second"]["first"] > 3
    assert min(losses["single:first"]["test"], losses["single:second"]["test"]) > 3


def test_dynamic_gate_beats_static_and_average(task_setup):
    runs = {f: json.loads((d / "run.json").read_text()) for f, d in task_setup["runs"].items()}
    flow = flow_model(task_setup)
    flow.load_gate(task_setup["runs"]["dynamic"])
    test = {"dynamic": held_out_loss(task_setup, flow)}
    for fusion in ("static", "static-per-layer", "average"):
        w = json.loads((task_setup["runs"][fusion] / "static.json").read_text())["weights"]
        flow.set_mode("static", w)
        test[fusion] = held_out_loss(task_setup, flow)
    # the static weights found by gradient are as good as any: a grid of fixed mixtures does no better
    grid = {}
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        for b in (0.0, 0.25, 0.5, 0.75, 1.0):
            flow.set_mode("static", [a, b])
            grid[(a, b)] = held_out_loss(task_setup, flow, "dev")
    best_grid = min(grid.values())
    dev = {f: r["best"]["dev_loss"] for f, r in runs.items()}
    print(f"\ndev loss (kept epoch): {dev}\ntest loss: {test}\nstatic weights learned: "
          f"{runs['static']['static_weights']}; best grid static dev loss {best_grid:.4f} at "
          f"{min(grid, key=grid.get)}\nper-epoch dev loss, dynamic: "
          f"{[round(e['dev_loss'], 3) for e in runs['dynamic']['epochs']]}")
    assert runs["static"]["static_weights"] != [0.0, 1.0]           # it did train
    assert np.shape(runs["static-per-layer"]["static_weights"]) == (2, 2)
    assert dev["static"] <= best_grid + 0.1
    for baseline in ("static", "static-per-layer", "average"):
        assert test["dynamic"] < 0.5 * test[baseline] and test[baseline] - test["dynamic"] > 1.5, (test, baseline)
        assert dev["dynamic"] < 0.5 * dev[baseline]
    assert test["dynamic"] < 0.5 * best_grid
    # run.json records what a run needs to be reproduced and compared
    r = runs["dynamic"]
    assert r["config"]["lr"] == DEFAULT_LR and r["config"]["epochs"] == 5 and r["fusion"] == "dynamic"
    assert len(r["data"]["train"]["sha256"]) == 64 and r["data"]["train"]["examples"] == 200
    assert [e["epoch"] for e in r["epochs"]] == list(range(6)) and r["timings"]["train_s"] > 0
    assert len(r["input_scales"]) == 2 and runs["static"]["input_scales"] is None
    assert r["trainable_parameters"] == 2 * (2 * 64 + 2)


def test_gate_switches_between_kinds_of_token(task_setup):
    from loraflow.gate_training.data import collate, load_examples
    from loraflow.gate_training.load import load_tokenizer

    s, task = task_setup, task_setup["task"]
    flow = flow_model(s)
    flow.load_gate(s["runs"]["dynamic"])
    tok = load_tokenizer(s["model"])
    examples = load_examples(s["files"]["test"], tok, 512, add_eos=False)
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        flow(batch["input_ids"], batch["attention_mask"])
    g = flow.last_gate_weights()                                 # [batch, tokens, layer, k]
    kind = dict(zip(task.token_ids, task.kind_a))
    a_rows, b_rows = [], []
    for i, e in enumerate(examples):
        for p in range(e.n_prompt - 1, len(e.input_ids) - 1):    # positions that predict a response word
            (a_rows if kind[e.input_ids[p]] else b_rows).append(g[i, p])
    a, b = np.array(a_rows), np.array(b_rows)                   # [n, layer, k]
    assert len(a) > 100 and len(b) > 100                         # the kinds do alternate
    da, db = a[..., 0] - a[..., 1], b[..., 0] - b[..., 1]        # weight of "first" minus "second"
    gap = da.mean(0) - db.mean(0)                                # per layer
    side = ((da > 0).mean(0) + (db < 0).mean(0)) / 2             # per layer: tokens on the right side
    print(f"\nmean gate weights (first, second) per layer on kind-A tokens {a.mean(0).round(3).tolist()}, "
          f"on kind-B tokens {b.mean(0).round(3).tolist()}; gap {gap.round(3).tolist()}, "
          f"tokens on the right side {side.round(3).tolist()}")
    best = int(np.argmax(gap))
    assert gap[best] > 0.5 and side[best] > 0.95
    assert gap.mean() > 0.25


def test_runtime_gives_the_torch_answers(task_setup, tmp_path):
    """Gate trained here -> convert_flow -> FlowLlama on the F32 GGUF: the same greedy tokens as
    the PyTorch model for >= 98% of the examples, dynamic and static; with --batch-size 4 the
    runtime's answers of one problem at a time."""
    from fixtures import convert_tiny_base

    from loraflow.converter.flow import convert_flow

    s = task_setup
    gguf = convert_tiny_base(s["model"], tmp_path / "model-f32.gguf")
    flow_file = convert_flow(gguf, [(n, s["loras"][n]) for n in ("first", "second")],
                             s["runs"]["dynamic"] / "gate.safetensors", tmp_path / "flow.gguf", outtype="f32")
    common = ["--data", s["files"]["test"], "--extract", "exact", "--max-tokens", LENGTH, "-q", "--threads", "1"]
    cases = {"dynamic": [], "static": ["--weights", s["runs"]["static-per-layer"] / "static.json"]}
    report = {}
    for mode, extra in cases.items():
        out = {}
        for backend, args in (("torch", ["--base", s["model"], *s["adapter_args"]]
                               + (["--gate", s["runs"]["dynamic"]] if mode == "dynamic" else [])),
                              ("runtime", ["-m", gguf, "-f", flow_file]),
                              ("runtime", ["-m", gguf, "-f", flow_file, "--batch-size", "4"])):
            name = backend if "--batch-size" not in args else "runtime-batched"
            path = tmp_path / f"{mode}-{name}.json"
            run_cli("eval", "--backend", backend, "--mode", mode, *extra, *args, *common, "-o", path)
            out[name] = json.loads(path.read_text())
        t, r = out["torch"], out["runtime"]
        # four problems at a time on the batch engine: the one-at-a-time answers, token for token
        assert [x["tokens"] for x in out["runtime-batched"]["results"]] == [x["tokens"] for x in r["results"]]
        assert out["runtime-batched"]["batch_size"] == 4
        same = np.mean([x["tokens"] == y["tokens"] for x, y in zip(t["results"], r["results"])])
        assert [x["prompt_tokens"] for x in t["results"]] == [x["prompt_tokens"] for x in r["results"]]
        report[mode] = (t["accuracy"], r["accuracy"], same)
        assert same >= 0.98 and abs(t["accuracy"] - r["accuracy"]) <= 0.02
    print(f"\n(torch accuracy, runtime accuracy, identical outputs) per mode: {report}")
    assert report["dynamic"][0] >= 0.9 > report["static"][0] + 0.3    # exact chains: the gate solves it


def test_chat_template_and_gguf_base(tiny_models, tmp_path):
    """The other path: a model with a chat template, `messages` rows, the base given as a GGUF
    (transformers dequantizes it), and eval parity with the template applied on both sides."""
    from fixtures import make_tiny_lora

    tm = tiny_models.get("llama")
    loras = [make_tiny_lora(tm.hf_dir, tmp_path / n, r=4, alpha=8, seed=i + 1, strength=0.5)
             for i, n in enumerate(("lang", "math"))]
    adapter_args = ["--adapter", f"lang={loras[0]}", "--adapter", f"math={loras[1]}"]
    rows = [{"messages": [{"role": "system", "content": "Answer with a number."},
                          {"role": "user", "content": f"What is {i} plus {i + 3}?"},
                          {"role": "assistant", "content": f"It is {2 * i + 3}."}]} for i in range(12)]
    rows += [{"prompt": f"Count to {i}.", "response": " ".join(map(str, range(1, i + 1))), "answer": i}
             for i in range(1, 9)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "gate"
    text = run_cli("train-gate", "--base", tm.gguf, *adapter_args, "--data", data, "--dev", data, "-o", out,
                   "--epochs", "1", "--dev-metric", "accuracy", "--dev-max-tokens", "4",
                   "--threads", "1", "-q")
    assert "kept epoch" in text and (out / "gate.safetensors").is_file()
    run = json.loads((out / "run.json").read_text())
    assert "dev_accuracy" in run["epochs"][1] and run["data"]["train"]["examples"] == 20

    from loraflow.converter.flow import convert_flow

    flow_file = convert_flow(tm.gguf, [("lang", loras[0]), ("math", loras[1])], out / "gate.safetensors",
                             tmp_path / "flow.gguf", outtype="f32")
    res = {}
    for backend, args in (("torch", ["--base", tm.hf_dir, *adapter_args, "--gate", out]),
                          ("runtime", ["-m", tm.gguf, "-f", flow_file])):
        path = tmp_path / f"{backend}.json"
        run_cli("eval", "--backend", backend, *args, "--data", data, "--max-tokens", 8, "-q", "--threads", "1", "-o", path)
        res[backend] = json.loads(path.read_text())["results"]
    assert [r["prompt_tokens"] for r in res["torch"]] == [r["prompt_tokens"] for r in res["runtime"]]
    assert res["torch"][0]["prompt_tokens"] > 20                       # system turn + template tokens
    same = np.mean([a["tokens"] == b["tokens"] for a, b in zip(res["torch"], res["runtime"])])
    print(f"\nchat template, GGUF base: identical greedy outputs torch vs runtime on {same:.0%} of {len(rows)}")
    assert same >= 0.98, same
