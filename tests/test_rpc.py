"""The flow graph on llama.cpp's RPC backend (loraflow.runtime.rpc), over loopback: two
rpc-servers on 127.0.0.1, started and stopped here, are two remote devices as far as ggml is
concerned.

- parity: a tiny 4-layer model (smollm3), k = 2 and 3, every mode, one batch and token by token,
  with every layer on the two servers, and with layer 0 on the local CPU and the rest on them;
  against the local CPU run of the same flow file (the servers run the same CPU kernels) and the
  PyTorch model of the method (parity_setup's CPU bound);
- the batch engine over RPC: every mode at once in one batch equals each alone;
- faults: a server that is not there is an error naming it; a server killed mid-decode ends the
  process with one error line and exit code 1, and no hang.

Needs a build with RPC and llama.cpp's rpc-server next to the interpreter (`make install-rpc`,
then `make test-rpc`); skips otherwise.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
llama_cpp = pytest.importorskip("llama_cpp")

from parity_setup import (N_TOKENS, RUNTIME, TOL, arch_loras, build_flow, modes_for, rel_err,  # noqa: E402
                          runtime_token_by_token, torch_logits)

from loraflow.errors import LoraFlowError  # noqa: E402

RPC_SERVER = Path(os.environ.get("LORAFLOW_RPC_SERVER", Path(sys.executable).parent / "loraflow-rpc-server"))
if not llama_cpp.llama_supports_rpc():
    pytest.skip("this llama-cpp-python has no RPC backend: `make install-rpc`, then `make test-rpc`",
                allow_module_level=True)
if not RPC_SERVER.is_file():
    pytest.skip(f"no rpc-server at {RPC_SERVER}: `python runtime/native/build.py --rpc-server` (make install-rpc)",
                allow_module_level=True)

LOCAL_TOL = 1e-5   # the same CPU kernels, remote: only the summation order of split work may differ
# (placement name, n_gpu_layers, tensor_split): llama.cpp offloads the last n_gpu_layers of the
# 4 layers + the output layer and splits them by the cumulative shares
PLACEMENTS = [("two-servers", -1, [1, 1]),      # layers 0-2 on the first, 3 and the output on the second
              ("cpu+two-servers", 4, [1, 1])]   # layer 0 local, 1-2 on the first, 3 and the output on the second


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RpcServer:
    """One rpc-server process on 127.0.0.1 (one CPU thread: the machine is small)."""

    def __init__(self, log_dir: Path, timeout: float = 30):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = open(log_dir / f"rpc-server-{self.port}.log", "w")
        self.proc = subprocess.Popen([str(RPC_SERVER), "-p", str(self.port), "-t", "1"], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"rpc-server on {self.address} did not start; see {self.log.name}")
                time.sleep(0.1)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("rpc-logs")
    started = []
    try:
        for _ in range(2):
            started.append(RpcServer(log_dir))
        yield [s.address for s in started]
    finally:
        for s in started:
            s.stop()


@pytest.fixture(scope="module")
def arch_setup(tiny_models, tmp_path_factory):
    tm = tiny_models.get("smollm3")
    assert tm.n_layer == 4, "PLACEMENTS assume 4 layers"
    return arch_loras(tm, tmp_path_factory.mktemp("rpc-parity"))


@pytest.fixture(scope="module", params=[2, 3])
def flow_setup(request, arch_setup):
    """k adapters: the flow file, the local CPU runtime (setup["llm"]) and the PyTorch model, and
    per mode the local run's logits (a batch, token by token) and gate weights."""
    setup = build_flow(arch_setup, request.param)
    llm, tokens = setup["llm"], setup["tokens"]
    setup["local"] = {}
    for mode, weights in modes_for(setup):
        llm.set_mode(mode, weights)
        llm.clear_gate_log()
        batch = llm.eval_logits(tokens)
        gates = llm.gate_weights()
        setup["local"][f"{mode}{weights}"] = (batch, runtime_token_by_token(llm, tokens), gates)
    yield setup
    llm.close()


def rpc_llm(setup, servers, n_gpu_layers, tensor_split):
    from loraflow.runtime import FlowLlama

    kw = dict(RUNTIME, n_gpu_layers=n_gpu_layers)
    return FlowLlama(str(setup["base"]), flow_path=str(setup["flow"]), record_gates=True,
                     rpc_servers=",".join(servers), tensor_split=tensor_split, **kw)


@pytest.mark.parametrize("placement, n_gpu_layers, tensor_split", PLACEMENTS, ids=[p[0] for p in PLACEMENTS])
def test_every_mode_matches_local_and_torch(flow_setup, servers, placement, n_gpu_layers, tensor_split):
    tokens, model = flow_setup["tokens"], flow_setup["model"]
    llm = rpc_llm(flow_setup, servers, n_gpu_layers, tensor_split)
    try:
        for mode, weights in modes_for(flow_setup):
            local_batch, local_token, local_gates = flow_setup["local"][f"{mode}{weights}"]
            llm.set_mode(mode, weights)
            llm.clear_gate_log()
            batch = llm.eval_logits(tokens)
            gates = llm.gate_weights()
            one_by_one = runtime_token_by_token(llm, tokens)
            model.set_mode(mode, weights)
            ref = torch_logits(model, tokens)
            print(f"[rpc] {placement} k={flow_setup['k']} {mode}: vs local batch {rel_err(batch, local_batch):.1e} "
                  f"token {rel_err(one_by_one, local_token):.1e}; vs torch {rel_err(batch, ref):.1e}")
            assert batch.shape == one_by_one.shape == (N_TOKENS, local_batch.shape[1])
            assert rel_err(batch, local_batch) < LOCAL_TOL, f"{mode} {weights}: batch vs local"
            assert rel_err(one_by_one, local_token) < LOCAL_TOL, f"{mode} {weights}: token by token vs local"
            assert rel_err(batch, ref) < TOL and rel_err(one_by_one, ref) < TOL, f"{mode} {weights}: vs torch"
            assert gates.shape == local_gates.shape
            if gates.size:   # recorded where the layer ran, read back from there
                assert np.abs(gates - local_gates).max() < LOCAL_TOL, f"{mode} {weights}: gate weights"
    finally:
        llm.close()


def test_batch_engine_mixed_modes_equal_solo(tiny_models, tmp_path_factory, servers):
    """Every mode at once in the batch engine, layers on the two servers: each answer is the one
    the request gets alone on the same placement."""
    from test_batch_engine import GREEDY, MODES, PROMPTS, solo
    from tiny_flow import build_tiny_flow

    from loraflow.runtime import FlowLlama
    from loraflow.runtime.batch_engine import BatchEngine

    tm = tiny_models.get("llama")
    flow = build_tiny_flow(tm, tmp_path_factory.mktemp("rpc-engine"), strength=2.0)
    llm = FlowLlama(str(tm.gguf), flow_path=str(flow), n_ctx=512, n_threads=1, verbose=False,
                    rpc_servers=servers, tensor_split=[1, 1])
    try:
        prompts = [llm.tokenize(p, add_bos=False) for p in PROMPTS]
        refs = [solo(llm, p, mode, w, 12) for p, (mode, w) in zip(prompts, MODES)]
        assert len({tuple(r) for r in refs}) == len(refs), "the modes should answer differently"
        engine = BatchEngine(llm, n_parallel=len(MODES), n_ctx=len(MODES) * 128)
        try:
            requests = [engine.submit(p, mode, w, max_tokens=12, sampling=GREEDY)
                        for p, (mode, w) in zip(prompts, MODES)]
            results = [r.result(timeout=120) for r in requests]
        finally:
            engine.close()
    finally:
        llm.close()
    for (mode, _), ref, res in zip(MODES, refs, results):
        assert res.tokens == ref, f"{mode}: batched {res.tokens} != alone {ref}"


def test_server_not_there_is_named(tiny_models, tmp_path):
    from click.testing import CliRunner
    from tiny_flow import build_tiny_flow

    from loraflow.cli import main
    from loraflow.runtime.loading import open_llm

    tm = tiny_models.get("llama")
    flow = build_tiny_flow(tm, tmp_path)
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(LoraFlowError, match=f"rpc-server {address} is not there"):
        open_llm(tm.gguf, flow, rpc_servers=address)
    with pytest.raises(LoraFlowError, match="not HOST:PORT"):
        open_llm(tm.gguf, flow, rpc_servers="localhost")
    result = CliRunner().invoke(main, ["generate", "-m", str(tm.gguf), "-f", str(flow), "-p", "hi", "-n", "2",
                                       "--rpc", address])
    assert result.exit_code == 1 and f"error: rpc-server {address} is not there" in result.stderr, result.output


def test_generate_cli_over_rpc(tiny_models, tmp_path, servers):
    """`loraflow generate --rpc ... --tensor-split 1,1` prints what it prints locally."""
    from click.testing import CliRunner
    from tiny_flow import build_tiny_flow

    from loraflow.cli import main

    tm = tiny_models.get("llama")
    flow = build_tiny_flow(tm, tmp_path)
    args = ["generate", "-m", str(tm.gguf), "-f", str(flow), "-p", "Once upon a time", "-n", "8", "--raw",
            "--temperature", "0", "--threads", "1", "--ctx", "256"]
    local = CliRunner().invoke(main, args)
    remote = CliRunner().invoke(main, args + ["--rpc", ",".join(servers), "--tensor-split", "1,1"])
    assert local.exit_code == 0 and remote.exit_code == 0, local.output + remote.output
    assert remote.stdout == local.stdout and local.stdout.strip()


KILLED_MID_DECODE = textwrap.dedent("""
    import sys
    from loraflow.runtime import FlowLlama

    base, flow, address = sys.argv[1:]
    llm = FlowLlama(base, flow_path=flow, rpc_servers=address, n_ctx=512, n_threads=1, verbose=False)
    tokens = llm.tokenize(b"Once upon a time", add_bos=False)
    for step in range(10 ** 6):
        if step % 200 == 0:
            llm.clear_kv()
            llm.eval(tokens)
        llm.eval([100 + step % 50])
        if step == 20:
            print("decoding", flush=True)
""")


def test_server_killed_mid_decode(tiny_models, tmp_path):
    """The process that decodes on a server that is killed: exit code 1 within seconds, one line
    `error: ...` naming the server, no C++ abort and no hang."""
    from tiny_flow import build_tiny_flow

    tm = tiny_models.get("llama")
    flow = build_tiny_flow(tm, tmp_path)
    server = RpcServer(tmp_path)
    proc = None
    try:
        proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_DECODE, str(tm.gguf), str(flow), server.address],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([proc.stdout], [], [], 120)   # it prints once it is decoding
        line = proc.stdout.readline() if ready else ""
        assert line.strip() == "decoding", "the client did not start decoding"
        server.stop(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        server.stop()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, (proc.returncode, err[-2000:])
    lines = [s for s in err.splitlines() if s.strip()]
    assert lines[-1].startswith("error: ") and server.address in lines[-1], err[-2000:]
