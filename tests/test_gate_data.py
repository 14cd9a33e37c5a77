"""Training data (rows -> tokens and labels), its errors through the CLI, and the training loop's
parts: the response-only loss, learnable static weights, the schedule, answer extraction."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from fixtures import make_tiny_lora, make_tiny_model  # noqa: E402
from gate_task import make_task_model, write_jsonl  # noqa: E402

from loraflow.cli import main  # noqa: E402
from loraflow.errors import LoraFlowError  # noqa: E402
from loraflow.gate_training.data import IGNORE, DataError, load_examples, read_rows  # noqa: E402

GOOD = {"prompt": "What is 2 plus 3?", "response": "5"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny llama with SmolLM2's chat template, one without a template, and one LoRA for each."""
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("gate-data")
    chat = make_tiny_model("llama", work / "chat", seed=3)
    plain = make_task_model(work / "plain", seed=4)
    return dict(work=work, chat=chat, plain=plain,
                lora_chat=[make_tiny_lora(chat, work / f"chat-{i}", r=2, alpha=4, seed=i) for i in (1, 2)],
                lora_plain=[make_tiny_lora(plain, work / f"plain-{i}", r=2, alpha=4, seed=i) for i in (1, 2)])


def tokenizer(path):
    from loraflow.gate_training.load import load_tokenizer

    return load_tokenizer(path)


def write_lines(path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# -- rows -> tokens ------------------------------------------------------------------------------

def test_labels_cover_the_response_only_without_template(models, tmp_path):
    tok = tokenizer(models["plain"])
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "Say hi.", "response": " hi there"}])
    ex = load_examples(data, tok, 64)
    e = ex[0]
    prompt = tok(GOOD["prompt"])["input_ids"]
    response = tok(GOOD["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert e.input_ids == prompt + response and e.n_prompt == len(prompt)
    assert e.labels == [IGNORE] * len(prompt) + response
    assert load_examples(data, tok, 64, add_eos=False)[0].labels[-1] != tok.eos_token_id


def test_chat_template_renders_prompt_and_response(models, tmp_path):
    tok = tokenizer(models["chat"])
    rows = [GOOD, {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+3?"},
                                {"role": "assistant", "content": "5"}]}]
    ex = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), tok, 256)
    for e in ex:
        prompt = tok.decode(e.prompt_ids)
        response = tok.decode([t for t in e.labels if t != IGNORE])
        assert prompt.endswith("<|im_start|>assistant\n") and response == "5<|im_end|>"
    assert "Be brief." in tok.decode(ex[1].prompt_ids) and "Hello<|im_end|>" in tok.decode(ex[1].prompt_ids)
    assert "You are a helpful AI assistant" in tok.decode(ex[0].prompt_ids)   # SmolLM2's default system turn


BAD = {
    "bad JSON": (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": '], 2, "not valid JSON"),
    "not an object": (['["a", "b"]'], 1, "expected a JSON object"),
    "missing response": (['{"prompt": "a", "response": "b"}', '', '{"prompt": "a"}'], 3, "missing field 'response'"),
    "missing both": (['{"question": "a"}'], 1, "missing field 'prompt' and 'response'"),
    "number prompt": (['{"prompt": 3, "response": "b"}'], 1, '"prompt" must be a string'),
    "empty response": (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": ""}'], 2,
                       "tokenizes to nothing"),
    "empty prompt": (['{"prompt": "", "response": "b"}'], 1, "prompt tokenizes to nothing"),
    "messages not ending with assistant": (['{"messages": [{"role": "user", "content": "a"}]}'], 1,
                                           "the last message must be the assistant's"),
    "bad role": (['{"messages": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}]}'], 1,
                 "messages[0]"),
    "system without template": (['{"prompt": "a", "response": "b", "system": "Be brief."}'], 1,
                                "need a chat template, and this tokenizer has none"),
    "too long": (['{"prompt": "a", "response": "b"}', json.dumps({"prompt": "a", "response": "word " * 80})], 2,
                 "more than the maximum length 32"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_rows_name_their_line(models, tmp_path, case):
    lines, line_no, message = BAD[case]
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as e:
        load_examples(path, tokenizer(models["plain"]), 32)
    assert f"{path}:{line_no}: " in str(e.value) and message in str(e.value), str(e.value)


def test_empty_file_and_truncation(models, tmp_path):
    tok = tokenizer(models["plain"])
    for text in ("", "\n  \n"):
        (tmp_path / "empty.jsonl").write_text(text)
        with pytest.raises(DataError, match="no examples"):
            read_rows(tmp_path / "empty.jsonl")
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "a", "response": "word " * 80}])
    e = load_examples(long, tok, 32, truncate=True)[0]
    assert len(e.input_ids) == 32 and e.n_response == 32 - e.n_prompt
    prompt_too_long = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "word " * 80, "response": "b"}])
    with pytest.raises(DataError, match=r"p.jsonl:1: the prompt alone has \d+ tokens"):
        load_examples(prompt_too_long, tok, 32, truncate=True)


def _train_args(models, data, out, *extra):
    a = models["lora_plain"]
    return ["train-gate", "--base", str(models["plain"]), "--adapter", f"a={a[0]}", "--adapter", f"b={a[1]}",
            "--data", str(data), "-o", str(out), "-q", "--threads", "1", *extra]


@pytest.mark.parametrize("case", ["bad JSON", "missing response", "empty response", "too long"])
def test_cli_reports_bad_data_with_line_and_exit_1(models, tmp_path, case):
    lines, line_no, message = BAD[case]
    bad = write_lines(tmp_path / "bad.jsonl", lines)
    result = CliRunner().invoke(main, _train_args(models, bad, tmp_path / "out", "--max-length", "32"))
    assert result.exit_code == 1, result.output
    assert f"error: {bad}:{line_no}: " in result.output and message in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_console_script_bad_data_no_traceback(models, tmp_path):
    """The installed `loraflow` command itself: bad data -> one `error:` line on stderr, exit code 1."""
    bad = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "a", "response": "b"}', "{oops"])
    exe = Path(sys.executable).parent / "loraflow"
    p = subprocess.run([str(exe)] + _train_args(models, bad, tmp_path / "out"), capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"error: {bad}:2: not valid JSON (Expecting property name enclosed in double quotes " \
                               "at column 2)"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = CliRunner().invoke(main, ["eval", "--data", str(empty), "--backend", "torch", "--base", str(models["plain"]),
                                  "--adapter", f"a={models['lora_plain'][0]}", "--mode", "single:a"])
    assert r.exit_code == 1 and "no examples" in r.output
    good = write_lines(tmp_path / "good.jsonl", ['{"prompt": "a", "response": "b"}'])
    r = CliRunner().invoke(main, ["eval", "--data", str(good), "--backend", "runtime", "-f", "flow.gguf",
                                  "--batch-size", "0"])
    assert r.exit_code == 1 and "error: batch-size must be at least 1" in r.output and "Traceback" not in r.output


def test_out_dir_needs_force(models, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = CliRunner().invoke(main, _train_args(models, data, out, "--fusion", "average"))
    assert r.exit_code == 1 and "not empty; pass --force" in r.output
    r = CliRunner().invoke(main, _train_args(models, data, out, "--fusion", "average", "--force"))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "static.json").read_text())["weights"] == [0.5, 0.5]
    assert (out / "notes.txt").read_text() == "mine"
    r = CliRunner().invoke(main, _train_args(models, data, out, "--per-layer", "--force"))
    assert r.exit_code == 1 and "--per-layer applies to --fusion static only" in r.output


# -- the training loop's parts ---------------------------------------------------------------------

def _flow(models, which="plain"):
    from loraflow.gate_training.load import load_flow_model

    a = models[f"lora_{which}"]
    return load_flow_model(models[which], [("a", a[0]), ("b", a[1])])


def test_response_loss_is_the_models_own_loss(models, tmp_path):
    from loraflow.gate_training.data import collate
    from loraflow.gate_training.train import response_loss

    tok = tokenizer(models["chat"])
    rows = [GOOD, {"prompt": "Name a colour, and explain why you like it.", "response": "Blue, like the sky."}]
    batch = collate(load_examples(write_jsonl(tmp_path / "d.jsonl", rows), tok, 256), tok.pad_token_id)
    flow = _flow(models, "chat")
    with torch.no_grad():
        loss, n = response_loss(flow.model, batch)
        ref = flow(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
    assert n == int((batch["labels"][:, 1:] != IGNORE).sum())
    assert abs(float(loss) / n - float(ref)) < 1e-4


def test_static_weights_train_by_gradient(models, tmp_path):
    from loraflow.gate_training.data import collate
    from loraflow.gate_training.train import response_loss

    tok = tokenizer(models["plain"])
    batch = collate(load_examples(write_jsonl(tmp_path / "d.jsonl", [GOOD]), tok, 64), tok.pad_token_id)
    flow = _flow(models)
    for per_layer, shape in ((False, (2,)), (True, (2, 2))):
        w = flow.learn_static(per_layer)
        assert tuple(w.shape) == shape and torch.allclose(w.detach().reshape(-1, 2)[0], torch.tensor([0.0, 1.0]))
        loss, n = response_loss(flow.model, batch)
        loss.backward()
        assert w.grad is not None and bool(torch.all(w.grad != 0))
        with torch.no_grad():
            flow.set_mode("static", w.detach().numpy())
            fixed, _ = response_loss(flow.model, batch)
        assert abs(float(fixed) - loss.item()) < 1e-4
    flow.set_mode("average")                     # a plain tensor again after a trainable one
    assert flow.mode.name == "average"


def test_gradient_checkpointing_same_gradients(models, tmp_path):
    from loraflow.gate_training.data import collate
    from loraflow.gate_training.train import enable_checkpointing, response_loss

    tok = tokenizer(models["plain"])
    batch = collate(load_examples(write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD]), tok, 64), tok.pad_token_id)
    grads = []
    for ckpt in (False, True):
        flow = _flow(models)
        with torch.no_grad():
            for g in flow.gates:
                g.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
        if ckpt:
            enable_checkpointing(flow.model)
            flow.model.train()
        calls = []
        flow.model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
        loss, n = response_loss(flow.model, batch)
        loss.backward()
        assert len(calls) == (2 if ckpt else 1)        # checkpointed: the layer runs again in backward
        grads.append(torch.cat([p.grad.reshape(-1) for p in flow.gates.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_bf16_training_keeps_fp32_gates(models, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 4)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, _train_args(models, data, out, "--dtype", "bf16", "--epochs", "1", "--lr", "1e-2"))
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    gate = load_file(str(out / "gate.safetensors"))
    assert gate["layers.0.weight"].dtype == torch.float32 and float(gate["layers.0.weight"].abs().sum()) > 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["dtype"] == "bf16" and run["best_epoch"] in (0, 1)


def test_schedule_warmup_then_cosine():
    from loraflow.gate_training.train import lr_at

    lrs = [lr_at(s, 100, 10, 1e-3) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-6


def test_extraction_rules():
    from loraflow.gate_training.evaluate import make_extractor

    last = make_extractor("last-number")
    assert last("so 3 + 4 = 7.") == "7" and last("total: 1,234.50 dollars") == "1234.5" and last("none") is None
    assert last("-2.0") == "-2" and last("it is 12") == "12"
    assert make_extractor("exact")("  Paris \n") == "Paris"
    assert make_extractor(r"regex:answer is (\w+)")("the answer is B, surely") == "B"
    assert make_extractor(r"regex:\d+")("a 42 b 7") == "42"
    for bad in ("regex:(", "first-word"):
        with pytest.raises(LoraFlowError):
            make_extractor(bad)


def test_torchrun_processes_train_like_one(models, tmp_path):
    """Data parallel (torchrun here, on CPU with gloo; `accelerate launch` sets the same environment):
    two processes give the one-process gate, also when a batch leaves one process without examples."""
    from safetensors.torch import load_file

    rows = [{"prompt": f"Add {i} and {i + 1}.", "response": f"{2 * i + 1}"} for i in range(7)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    args = _train_args(models, data, tmp_path / "one", "--epochs", "2", "--batch-size", "3", "--lr", "1e-2",
                       "--dev", str(data))
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    bin_dir = Path(sys.executable).parent
    with socket.socket() as sock:                            # a free port for the process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = [str(a).replace(str(tmp_path / "one"), str(tmp_path / "two")) for a in args]
    p = subprocess.run([str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
                        str(bin_dir / "loraflow"), *two], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("kept epoch") == 1                  # one process reports
    a, b = (load_file(str(tmp_path / d / "gate.safetensors")) for d in ("one", "two"))
    assert float(a["layers.0.weight"].abs().sum()) > 0
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    ra, rb = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("one", "two"))
    assert rb["processes"] == 2 and ra["processes"] == 1
    assert [e["dev_loss"] for e in ra["epochs"]] == pytest.approx([e["dev_loss"] for e in rb["epochs"]], rel=1e-5)


def test_batched_torch_generation_equals_one_at_a_time(models):
    """`loraflow eval --batch-size N` (left-padded prompts of different lengths decoded together)
    gives the tokens that decoding each prompt alone gives, with the gates of dynamic mode active."""
    from fixtures import make_random_gate

    from loraflow.gate_training.evaluate import generate_torch
    from loraflow.gate_training.load import load_flow_model

    tok = tokenizer(models["chat"])
    names = ["a", "b"]
    flow = load_flow_model(models["chat"], list(zip(names, map(str, models["lora_chat"]))))
    cfg = flow.model.config
    gate = make_random_gate(cfg.num_hidden_layers, 2, cfg.hidden_size, models["work"] / "batch-gate", names, seed=5)
    flow.load_gate(gate)
    flow.set_mode("dynamic")
    texts = ["2 plus 3", "What is the sum of seven and eight, and why?", "hi", "one two three four five six"]
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)          # padding is really exercised
    alone = generate_torch(flow, tok, prompts, max_tokens=12, batch_size=1)
    together = generate_torch(flow, tok, prompts, max_tokens=12, batch_size=4)
    assert together == alone
    assert all(len(g) > 0 for g in alone)
