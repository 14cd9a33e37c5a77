"""`loraflow generate` and `loraflow chat` driven as a user drives them (click's runner, real
files: a tiny llama model and a tiny two-LoRA flow file), checked against FlowLlama itself."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from tiny_flow import NAMES, build_tiny_flow  # noqa: E402

from loraflow.cli import main  # noqa: E402

GREEDY = ["--temperature", "0", "--threads", "1", "--ctx", "512"]


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    from loraflow.runtime import FlowLlama

    tm = tiny_models.get("llama")
    flow = build_tiny_flow(tm, tmp_path_factory.mktemp("cli-runtime"))
    llm = FlowLlama(str(tm.gguf), flow_path=str(flow), n_ctx=512, n_threads=1, verbose=False)
    yield dict(base=str(tm.gguf), flow=str(flow), llm=llm)
    llm.close()


def run(args, input=None):
    result = CliRunner().invoke(main, args, input=input, catch_exceptions=False)
    return result


def chat_reference(llm, mode, messages, max_tokens):
    llm.set_mode(mode)
    out = llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0)
    return out["choices"][0]["message"]["content"]


def test_generate_chat_template(setup):
    """Default: the model's chat template; the text equals FlowLlama's own greedy answer."""
    ref = chat_reference(setup["llm"], "dynamic", [{"role": "user", "content": "Hello there"}], 12)
    r = run(["generate", "-m", setup["base"], "-f", setup["flow"], "-p", "Hello there", "-n", "12", *GREEDY])
    assert r.exit_code == 0, r.output
    assert ref.strip() and r.stdout == ref + "\n"


def test_generate_raw_and_modes(setup):
    llm = setup["llm"]
    texts = {}
    for mode, extra in [("dynamic", []), ("single:math", []), ("static", ["--weights", "0.3,0.7"])]:
        llm.set_mode(mode, [0.3, 0.7] if mode == "static" else None)
        ref = llm.create_completion("The weather today", max_tokens=10, temperature=0.0)["choices"][0]["text"]
        r = run(["generate", "-m", setup["base"], "-f", setup["flow"], "-p", "The weather today", "--raw",
                 "--mode", mode, *extra, "-n", "10", *GREEDY])
        assert r.exit_code == 0, r.output
        assert r.stdout == ref + "\n"
        texts[mode] = r.stdout
    assert len(set(texts.values())) > 1, f"every mode wrote the same text: {texts}"


def test_generate_streams_token_by_token(setup):
    """Each token's text reaches the output (and is flushed) as soon as it is sampled."""
    from loraflow.runtime.interactive import stream_generate
    from loraflow.runtime.sampling import Sampling

    class Recorder(io.StringIO):
        def __init__(self):
            super().__init__()
            self.flushed = []

        def flush(self):
            self.flushed.append(self.getvalue())

    llm = setup["llm"]
    llm.set_mode("dynamic")
    out = Recorder()
    text = stream_generate(llm, "Once upon a time", Sampling(temperature=0.0), 10, chat=False, out=out)
    assert out.getvalue() == text
    # one flush per token, each showing more text than the last
    assert len(out.flushed) >= 5
    assert all(len(a) < len(b) for a, b in zip(out.flushed, out.flushed[1:]))


def test_generate_sampling_options_and_seed(setup):
    args = ["generate", "-m", setup["base"], "-f", setup["flow"], "-p", "Hi", "--raw", "-n", "8", "--threads", "1",
            "--temperature", "1.2", "--top-p", "0.9", "--top-k", "50", "--repeat-penalty", "1.1", "--seed", "42",
            "--n-gpu-layers", "0", "--ctx", "256"]
    a, b = run(args), run(args)
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert a.stdout.strip() and a.stdout == b.stdout


def test_generate_errors(setup, tmp_path):
    r = run(["generate", "-m", setup["base"], "-f", setup["flow"], "-p", "Hi", "--mode", "single:nope"])
    assert r.exit_code == 1 and "error: mode 'single:nope': no adapter named 'nope'" in r.stderr
    r = run(["generate", "-m", setup["base"], "-f", setup["flow"], "-p", "Hi", "--mode", "static"])
    assert r.exit_code == 1 and "needs weights" in r.stderr
    r = run(["generate", "-m", setup["base"], "-f", setup["flow"], "-p", "Hi", "--mode", "static", "--weights", "a,b"])
    assert r.exit_code == 1 and "weights must be numbers" in r.stderr
    r = run(["generate", "-m", setup["base"], "-f", str(tmp_path / "missing.gguf"), "-p", "Hi"])
    assert r.exit_code == 1 and "no such flow file" in r.stderr
    r = run(["generate", "-m", str(tmp_path / "missing.gguf"), "-f", setup["flow"], "-p", "Hi"])
    assert r.exit_code == 1 and "no such model file" in r.stderr


def test_chat_two_turns_and_mode_switch(setup):
    """Two answers with history; `/mode` switches the fusion mode between turns (the status
    line says so, and the second answer is the one that mode gives, not the old one's)."""
    llm = setup["llm"]
    q1, q2 = "hello", "how are you"
    a1 = chat_reference(llm, "dynamic", [{"role": "user", "content": q1}], 8)
    history = [{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
               {"role": "user", "content": q2}]
    refs = {m: chat_reference(llm, m, history, 8) for m in ["dynamic", *(f"single:{n}" for n in NAMES), "off"]}
    new_mode = next((m for m in refs if m != "dynamic" and refs[m] != refs["dynamic"]), None)
    assert new_mode, f"no mode changes the second answer: {refs}"

    r = run(["chat", "-m", setup["base"], "-f", setup["flow"], "-n", "8", *GREEDY],
            input=f"{q1}\n/mode {new_mode}\n{q2}\n/quit\nnever read\n")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "[mode: dynamic]" in out
    assert f"[mode: {new_mode}]" in out
    i_a1, i_switch, i_a2 = out.index(a1), out.index(f"[mode: {new_mode}]"), out.rindex(refs[new_mode])
    assert i_a1 < i_switch < i_a2, out
    assert refs["dynamic"] not in out[i_switch:], "the second answer is the old mode's"


def test_chat_commands(setup):
    r = run(["chat", "-m", setup["base"], "-f", setup["flow"], "-n", "4", *GREEDY],
            input="/mode bogus\n/mode static 0.25,0.75\n/mode\nhi\n/reset\n/help\n/what\n")
    assert r.exit_code == 0, r.output  # ends at end of input, typos do not end the chat
    out = r.stdout
    assert "[error: unknown mode 'bogus'" in out
    assert "[mode: static 0.25,0.75]" in out
    assert "adapters: lang, math" in out
    assert "[history cleared]" in out
    assert "[unknown command /what]" in out


def test_console_script_generate(setup):
    """The installed `loraflow` program, as a shell runs it; the prompt read from stdin."""
    exe = Path(sys.executable).with_name("loraflow")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-c", "from loraflow.cli import main; main()"]
    p = subprocess.run(cmd + ["generate", "-m", setup["base"], "-f", setup["flow"], "-p", "-", "-n", "6", *GREEDY],
                       input="Hello there", capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    ref = chat_reference(setup["llm"], "dynamic", [{"role": "user", "content": "Hello there"}], 6)
    assert p.stdout == ref + "\n"


def test_chat_drops_old_turns_when_the_context_is_full(setup):
    lines = "".join(f"message number {i} that is long enough to fill a small context soon\n" for i in range(10))
    r = run(["chat", "-m", setup["base"], "-f", setup["flow"], "-n", "20", "--temperature", "0", "--threads", "1",
             "--ctx", "200"], input=lines)
    assert r.exit_code == 0, r.output
    assert "[context full: dropped the oldest" in r.stdout
    assert "[error" not in r.stdout


def test_one_way_to_give_weights(setup, tmp_path):
    """--weights alone means static (as HTTP's flow_weights alone), a static.json works wherever
    numbers do, its adapter names are checked, and a mistyped path is "no such file"."""
    args = ["generate", "-m", setup["base"], "-f", setup["flow"], "-p", "Hi", "--raw", "-n", "6", *GREEDY]
    numbers = run(args + ["--mode", "static", "--weights", "0.25,0.75"])
    alone = run(args + ["--weights", "0.25,0.75"])
    static_json = tmp_path / "static.json"
    static_json.write_text(json.dumps({"adapters": NAMES, "weights": [0.25, 0.75]}))
    from_file = run(args + ["--weights", str(static_json)])
    assert numbers.exit_code == alone.exit_code == from_file.exit_code == 0, numbers.output + alone.output
    assert numbers.stdout.strip() and numbers.stdout == alone.stdout == from_file.stdout
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps({"adapters": NAMES[::-1], "weights": [0.25, 0.75]}))
    r = run(args + ["--weights", str(swapped)])
    assert r.exit_code == 1 and f"the weights are for adapters [{NAMES[1]}, {NAMES[0]}]" in r.stderr
    r = run(args + ["--weights", str(tmp_path / "statc.json")])
    assert r.exit_code == 1 and "no such static weights file" in r.stderr
    r = run(args + ["--mode", "dynamic", "--weights", "0.5,0.5"])
    assert r.exit_code == 1 and "mode 'dynamic' takes no weights" in r.stderr


def test_ctrl_c_stops_the_answer_and_keeps_the_conversation(setup):
    """Ctrl-C while an answer streams ends that answer, not the chat: the partial answer stays in
    the history and the next turn is answered (as llama.cpp's chat does)."""
    from loraflow.runtime.interactive import ChatSession
    from loraflow.runtime.sampling import Sampling

    llm = setup["llm"]
    llm.set_mode("dynamic")

    class Interrupting(io.StringIO):
        pieces = 0

        def write(self, text):
            if self.pieces == 2:
                self.pieces += 1
                raise KeyboardInterrupt
            self.pieces += bool(text.strip())
            return super().write(text)

    session = ChatSession(llm, Sampling(temperature=0.0), max_tokens=12)
    out = Interrupting()
    assert session.handle("hello", out)
    assert "[stopped]" in out.getvalue() and len(session.history) == 2 and session.history[1]["content"]
    out2 = io.StringIO()
    assert session.handle("and then?", out2) and len(session.history) == 4 and out2.getvalue().strip()
