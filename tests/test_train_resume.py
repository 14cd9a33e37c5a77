"""`loraflow train-gate --resume`: a run killed mid-epoch continues from its last completed epoch
(OUT_DIR/train-state.pt) to the very gate an uninterrupted run ends with; a resume with other
settings or data, or with no state, is refused and changes nothing.

The model is the tiny llama of tests/gate_task.py with two random LoRAs; 200 examples make an
epoch take about 2 s on one thread, long enough to kill the run inside its second epoch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from gate_task import make_task, make_task_model, write_jsonl  # noqa: E402

from loraflow.cli import main  # noqa: E402
from loraflow.gate_training.train import STATE_FILE  # noqa: E402

EPOCHS = 3


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def run_ok(*args):
    r = cli(*args)
    assert r.exit_code == 0, r.output
    return r.output


def snapshot(folder: Path) -> dict:
    """Every file under `folder`: its bytes' sha256 and mtime."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def epoch_rows(run: dict) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "seconds"} for e in run["epochs"]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model, LoRAs and data; an uninterrupted run; and a run SIGKILLed in its second epoch."""
    from fixtures import make_tiny_lora
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("resume")
    model = make_task_model(work / "model")
    task = make_task(AutoTokenizer.from_pretrained(str(model)))
    loras = [(n, make_tiny_lora(model, work / f"lora-{n}", seed=i + 1, strength=0.5)) for i, n in enumerate("ab")]
    files = {"train": write_jsonl(work / "train.jsonl", task.rows(task.T, 200, 10, seed=7)),
             "dev": write_jsonl(work / "dev.jsonl", task.rows(task.T, 40, 10, seed=8)),
             "other": write_jsonl(work / "other.jsonl", task.rows(task.T, 200, 10, seed=9))}
    common = ["--base", model, *[x for n, p in loras for x in ("--adapter", f"{n}={p}")],
              "--dev", files["dev"], "--epochs", EPOCHS, "--no-eos", "--threads", "1", "-q"]
    args = lambda out, data=files["train"]: ["train-gate", *common, "--data", data, "-o", out]  # noqa: E731

    whole = work / "whole"
    run_ok(*args(whole))

    # the same run as a process of its own, killed once the first epoch's state is written and the
    # second epoch is half done
    killed = work / "killed"
    bin_dir = Path(sys.executable).parent
    proc = subprocess.Popen([str(bin_dir / "loraflow"), *map(str, args(killed))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (killed / STATE_FILE).is_file():
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no state after 120 s"
            time.sleep(0.02)
        state = torch.load(killed / STATE_FILE, weights_only=True)
        time.sleep(state["epochs_done"][1]["seconds"] / 2)       # into the second epoch
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    pristine = work / "killed-copy"                                 # for the tests that must refuse it
    shutil.copytree(killed, pristine)
    return dict(work=work, args=args, files=files, whole=whole, killed=killed, pristine=pristine,
                killed_output=output)


def test_killed_run_resumes_to_the_uninterrupted_gate(setup):
    from safetensors.torch import load_file

    s = setup
    killed = s["killed"]
    # killed in the middle: the first epoch's state and nothing else
    assert "epoch 1:" in s["killed_output"] and "epoch 2:" not in s["killed_output"], s["killed_output"]
    assert sorted(p.name for p in killed.iterdir()) == [STATE_FILE]
    assert torch.load(killed / STATE_FILE, weights_only=True)["epoch"] == 1

    # without --resume the folder is refused, naming the way on
    r = cli(*s["args"](killed))
    assert r.exit_code == 1 and "--resume" in r.output and "--force" in r.output

    out = run_ok(*s["args"](killed), "--resume")
    assert f"resuming from epoch 1/{EPOCHS}" in out
    assert sorted(p.name for p in killed.iterdir()) == ["gate.safetensors", "run.json"]   # state removed
    a, b = load_file(str(s["whole"] / "gate.safetensors")), load_file(str(killed / "gate.safetensors"))
    assert sorted(a) == sorted(b)
    diff = max(float((a[key] - b[key]).abs().max()) for key in a)
    print(f"\nresumed vs uninterrupted gate: largest difference {diff}")
    for key in a:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)      # bit for bit
    ra, rb = (json.loads((d / "run.json").read_text()) for d in (s["whole"], killed))
    assert epoch_rows(ra) == epoch_rows(rb) and ra["best_epoch"] == rb["best_epoch"]
    assert ra["input_scales"] == rb["input_scales"]
    assert ra["resumed_from_epochs"] == [] and rb["resumed_from_epochs"] == [1]
    assert float(a["layers.0.weight"].abs().sum()) > 0                                    # it did train

    # a finished run has nothing to resume
    r = cli(*s["args"](killed), "--resume")
    assert r.exit_code == 1 and "nothing to resume" in r.output and "finished" in r.output


@pytest.mark.parametrize("change", ["lr", "data", "epochs"])
def test_resume_with_other_settings_is_refused(setup, tmp_path, change):
    s = setup
    out = tmp_path / "out"
    shutil.copytree(s["pristine"], out)
    before = snapshot(out)
    args = s["args"](out, s["files"]["other"]) if change == "data" else s["args"](out)
    extra = {"lr": ["--lr", "0.01"], "data": [], "epochs": ["--epochs", EPOCHS + 1]}[change]
    r = cli(*args, *extra, "--resume")
    assert r.exit_code == 1, r.output
    msg = r.output.strip().splitlines()[-1]
    assert msg.startswith(f"error: {out}: cannot resume"), msg
    named = {"lr": "--lr 0.02 then, 0.01 now", "data": "--data: a different file",
             "epochs": f"--epochs {EPOCHS} then, {EPOCHS + 1} now"}[change]
    assert named in msg and msg.count(" then, ") == 1, msg
    assert snapshot(out) == before


def test_resume_without_a_state_is_refused(setup, tmp_path):
    s = setup
    for out in (tmp_path / "missing", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        r = cli(*s["args"](out), "--resume")
        assert r.exit_code == 1 and f"{out}: nothing to resume, no {STATE_FILE} there" in r.output, r.output
        assert not out.exists() or list(out.iterdir()) == []


def test_static_fusion_resumes_too(setup, tmp_path):
    """The static baseline (per layer), interrupted in-process right after its first epoch's state
    is written (a log line that raises), resumes to the uninterrupted weights and losses."""
    from loraflow.gate_training.train import TrainConfig, train_gate

    s = setup
    w = s["work"]
    cfg = lambda: TrainConfig(fusion="static", per_layer=True, epochs=EPOCHS, add_eos=False, threads=1)  # noqa: E731
    adapters = [(n, w / f"lora-{n}") for n in "ab"]
    run = lambda out, **kw: train_gate(cfg(), w / "model", adapters, s["files"]["train"], out,  # noqa: E731
                                       dev=s["files"]["dev"], progress=False, **kw)

    class Stop(Exception):
        pass

    def stop_after_epoch_1(line):
        if line.startswith("epoch 1:"):
            raise Stop

    whole = run(tmp_path / "whole", log=lambda *a: None)
    with pytest.raises(Stop):
        run(tmp_path / "cut", log=stop_after_epoch_1)
    assert [p.name for p in (tmp_path / "cut").iterdir()] == [STATE_FILE]
    lines = []
    resumed = run(tmp_path / "cut", log=lines.append, resume=True)
    assert lines[0].startswith(f"resuming from epoch 1/{EPOCHS}")
    assert resumed["static_weights"] == whole["static_weights"] != [[0.0, 1.0], [0.0, 1.0]]
    assert epoch_rows(resumed) == epoch_rows(whole) and resumed["resumed_from_epochs"] == [1]
    assert (tmp_path / "cut" / "static.json").read_text() == (tmp_path / "whole" / "static.json").read_text()
    assert not (tmp_path / "cut" / STATE_FILE).exists()


def test_force_starts_over(setup, tmp_path):
    """--force without --resume on an interrupted run's folder trains from the start (its state goes)."""
    s = setup
    out = tmp_path / "out"
    shutil.copytree(s["pristine"], out)
    text = run_ok(*s["args"](out), "--force", "--epochs", "1")
    assert "resuming" not in text
    assert sorted(p.name for p in out.iterdir()) == ["gate.safetensors", "run.json"]
    assert json.loads((out / "run.json").read_text())["resumed_from_epochs"] == []


@pytest.mark.slow                     # about a minute on two cores: two torchrun launches of two processes
def test_torchrun_run_resumes(setup, tmp_path):
    """Two processes (torchrun, gloo on CPU): SIGTERM to torchrun in the second epoch, then
    `torchrun ... --resume`; the first process alone writes the state and the outputs, and the
    gate is the one-process gate to 1e-5, as for an uninterrupted torchrun run (test_gate_data.py)."""
    import socket

    from safetensors.torch import load_file

    s = setup
    bin_dir = Path(sys.executable).parent
    out, one = tmp_path / "two", tmp_path / "one"
    # 80 of the examples: an epoch of 10 steps, still a few seconds with two processes on two cores
    small = tmp_path / "small.jsonl"
    small.write_text("".join(s["files"]["train"].read_text().splitlines(keepends=True)[:80]))
    run_ok(*s["args"](one, small))

    def torchrun(*extra):
        with socket.socket() as sock:                        # a free port for the process group
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
                str(bin_dir / "loraflow"), *map(str, s["args"](out, small)), *extra]

    proc = subprocess.Popen(torchrun(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not (out / STATE_FILE).is_file():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "no state after 180 s"
            time.sleep(0.02)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)                     # torchrun passes it on to its workers
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sorted(p.name for p in out.iterdir()) == [STATE_FILE]
    assert torch.load(out / STATE_FILE, weights_only=True)["epoch"] < EPOCHS
    p = subprocess.run(torchrun("--resume"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("resuming from epoch") == 1 and p.stdout.count("kept epoch") == 1
    assert sorted(x.name for x in out.iterdir()) == ["gate.safetensors", "run.json"]
    a, b = load_file(str(one / "gate.safetensors")), load_file(str(out / "gate.safetensors"))
    print(f"\ntorchrun resumed vs one process: largest difference "
          f"{max(float((a[k] - b[k]).abs().max()) for k in a)}")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    run = json.loads((out / "run.json").read_text())
    assert run["processes"] == 2 and len(run["resumed_from_epochs"]) == 1
