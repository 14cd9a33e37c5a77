"""`loraflow serve` end to end: the real server in a subprocess on 127.0.0.1 (a free port),
a tiny llama model with a tiny flow file, and a real HTTP client (urllib); one request at a
time (--parallel 1) and batched (--parallel 4), the same tests for both. Answers are checked
against FlowLlama run in this process with the same greedy settings."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tiny_flow import build_tiny_flow  # noqa: E402

HOST = "127.0.0.1"
START_TIMEOUT = 90  # seconds for the server to answer /health
REQUEST_TIMEOUT = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def loraflow_cmd():
    exe = Path(sys.executable).with_name("loraflow")
    return [str(exe)] if exe.is_file() else [sys.executable, "-c", "from loraflow.cli import main; main()"]


def start_server(base, flow, log_path, parallel=1, ctx=4096, threads=1):
    """Start `loraflow serve`; return (process, base URL) once /health answers."""
    for _ in range(3):  # another process may grab the free port first
        port = free_port()
        log = open(log_path, "w")
        proc = subprocess.Popen(loraflow_cmd() + ["serve", "-m", base, "-f", flow, "--host", HOST, "--port", str(port),
                                                  "--threads", str(threads), "--ctx", str(ctx), "--log-level",
                                                  "warning", "--parallel", str(parallel)],
                                stdout=log, stderr=subprocess.STDOUT)
        log.close()
        url = f"http://{HOST}:{port}"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return proc, url
            except OSError:
                time.sleep(0.3)
        stop_server(proc)
        if "address already in use" not in Path(log_path).read_text().lower():
            break
    raise AssertionError(f"the server did not start:\n{Path(log_path).read_text()}")


def stop_server(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module", params=[1, 4], ids=["one-at-a-time", "parallel-4"])
def server(request, tiny_models, tmp_path_factory):
    from loraflow.runtime import FlowLlama

    tm = tiny_models.get("llama")
    work = tmp_path_factory.mktemp("server")
    flow = build_tiny_flow(tm, work)
    proc, url = start_server(str(tm.gguf), str(flow), work / "server.log", parallel=request.param)
    llm = FlowLlama(str(tm.gguf), flow_path=str(flow), n_ctx=512, n_threads=1, verbose=False)
    try:
        yield dict(url=url, llm=llm, proc=proc, log=work / "server.log", parallel=request.param)
    finally:
        llm.close()
        stop_server(proc)


def post(url, body, stream=False):
    """POST JSON; returns (status, parsed JSON) or, with stream=True, the open response."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        resp = urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())
    if stream:
        return resp.status, resp
    with resp:
        return resp.status, json.loads(resp.read().decode())


def sse_events(resp):
    """The `data:` payloads of a server-sent event stream, as they arrive."""
    with resp:
        for raw in resp:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data: "):
                yield line[len("data: "):]


MESSAGES = [{"role": "user", "content": "Tell me about the sea"}]


def test_models(server):
    with urllib.request.urlopen(server["url"] + "/v1/models", timeout=REQUEST_TIMEOUT) as r:
        data = json.loads(r.read().decode())
    (model,) = data["data"]
    assert data["object"] == "list" and model["object"] == "model"
    assert model["flow"]["adapters"] == ["lang", "math"]
    assert "single:math" in model["flow"]["modes"]


def test_streamed_chat_completion(server):
    llm = server["llm"]
    llm.set_mode("single:lang")
    ref = llm.create_chat_completion(MESSAGES, max_tokens=10, temperature=0.0)["choices"][0]["message"]["content"]
    status, resp = post(server["url"] + "/v1/chat/completions",
                        dict(messages=MESSAGES, max_tokens=10, temperature=0.0, stream=True, flow_mode="single:lang"),
                        stream=True)
    assert status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = list(sse_events(resp))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["flow_mode"] == "single:lang" for c in chunks)
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks]
    pieces = [p for p in pieces if p]
    assert len(pieces) >= 3, chunks  # token by token, not one block
    assert "".join(pieces) == ref
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_completion_per_request_mode(server):
    llm = server["llm"]
    texts = {}
    for mode, weights in [("dynamic", None), ("single:math", None), ("static", [0.2, 0.9])]:
        llm.set_mode(mode, weights)
        ref = llm.create_completion("The weather today", max_tokens=8, temperature=0.0)["choices"][0]["text"]
        body = dict(prompt="The weather today", max_tokens=8, temperature=0.0, flow_mode=mode)
        if weights:
            body["flow_weights"] = weights
        status, out = post(server["url"] + "/v1/completions", body)
        assert status == 200, out
        assert out["object"] == "text_completion" and out["flow_mode"] == mode
        assert out["choices"][0]["text"] == ref, mode
        assert out["usage"]["completion_tokens"] == 8
        texts[mode] = ref
    assert len(set(texts.values())) > 1, texts
    # no flow_mode: the server's default (dynamic), even right after another mode
    status, out = post(server["url"] + "/v1/completions", dict(prompt="The weather today", max_tokens=8,
                                                                temperature=0.0))
    assert status == 200 and out["flow_mode"] == "dynamic" and out["choices"][0]["text"] == texts["dynamic"]


def test_ignore_eos_generates_max_tokens(server):
    """llama.cpp's server field: no end-of-generation token is sampled, so the answer has exactly
    max_tokens tokens, and they are what FlowLlama gives with those tokens' logits at -inf."""
    llm = server["llm"]
    llm.set_mode("dynamic")
    bias = {t: float("-inf") for t in llm.eog_tokens}
    assert bias, "the tiny model has end-of-generation tokens"
    ref = llm.create_completion("The weather today", max_tokens=24, temperature=0.0, logit_bias=bias)
    status, out = post(server["url"] + "/v1/completions", dict(prompt="The weather today", max_tokens=24,
                                                                temperature=0.0, ignore_eos=True))
    assert status == 200, out
    assert out["usage"]["completion_tokens"] == 24 and out["choices"][0]["finish_reason"] == "length"
    assert out["choices"][0]["text"] == ref["choices"][0]["text"]


@pytest.mark.parametrize("body, param, fragment", [
    (dict(flow_mode="bogus"), "flow_mode", "unknown mode 'bogus'"),
    (dict(flow_mode="single:nope"), "flow_mode", "no adapter named 'nope'"),
    (dict(flow_mode="static"), "flow_weights", "needs weights"),
    (dict(flow_mode="static", flow_weights=[1, 2, 3]), "flow_weights", "shape"),
    (dict(flow_weights="x,y"), "flow_weights", "numbers"),
    (dict(flow_mode="dynamic", flow_weights=[0.5, 0.5]), "flow_weights", "takes no weights"),
    (dict(flow_mode="bogus", stream=True), "flow_mode", "unknown mode"),
    (dict(temperature="hot"), "temperature", "temperature"),
])
def test_bad_request_is_400(server, body, param, fragment):
    status, out = post(server["url"] + "/v1/chat/completions", dict(messages=MESSAGES, max_tokens=4, **body))
    assert status == 400, out
    err = out["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and fragment in err["message"], err


def test_client_leaving_mid_stream_frees_the_model(server):
    """A client that disconnects in the middle of a stream stops its generation: the model is
    free for the next request at once (the 4000 tokens asked for take ~30 s on 2 CPU cores)."""
    status, resp = post(server["url"] + "/v1/completions",
                        dict(prompt="Count", max_tokens=4000, temperature=0.0, stream=True), stream=True)
    assert status == 200
    assert next(sse_events(resp)) is not None
    resp.close()
    t0 = time.monotonic()
    status, out = post(server["url"] + "/v1/completions", dict(prompt="Hi", max_tokens=3, temperature=0.0))
    assert status == 200, out
    assert time.monotonic() - t0 < 10, "the abandoned generation kept the model busy"
    assert server["proc"].poll() is None


def test_health_shows_the_slots(server):
    with urllib.request.urlopen(server["url"] + "/health", timeout=REQUEST_TIMEOUT) as r:
        health = json.loads(r.read().decode())
    assert health["status"] == "ok" and health["slots"] == server["parallel"] and health["slots_busy"] == 0
    if server["parallel"] > 1:
        assert health["queued"] == 0


def test_concurrent_requests_in_mixed_modes(server):
    """Eight clients at once, each in another mode: every answer is the one it gets alone."""
    import threading

    llm = server["llm"]
    jobs = [("dynamic", None), ("single:math", None), ("static", [0.2, 0.9]), ("off", None), ("average", None),
            ("single:lang", None), ("static", [1.0, -0.5]), ("dynamic", None)]
    prompts = [f"Story number {i}:" for i in range(len(jobs))]
    refs = []
    for prompt, (mode, weights) in zip(prompts, jobs):
        llm.set_mode(mode, weights)
        refs.append(llm.create_completion(prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"])
    llm.set_mode("dynamic")
    out = [None] * len(jobs)

    def client(i):
        mode, weights = jobs[i]
        body = dict(prompt=prompts[i], max_tokens=8, temperature=0.0, flow_mode=mode)
        if weights:
            body["flow_weights"] = weights
        out[i] = post(server["url"] + "/v1/completions", body)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    [t.start() for t in threads]
    [t.join(REQUEST_TIMEOUT * 2) for t in threads]
    for i, (status, body) in enumerate(out):
        assert status == 200, body
        assert body["choices"][0]["text"] == refs[i], (jobs[i], body)


def test_batched_server_refuses_what_it_cannot_do(server):
    if server["parallel"] == 1:
        pytest.skip("one at a time, llama-cpp-python's completion does logprobs and echo")
    for extra, param in ((dict(logprobs=2), "logprobs"), (dict(echo=True), "echo")):
        status, out = post(server["url"] + "/v1/completions", dict(prompt="Hi", max_tokens=2, **extra))
        assert status == 400 and out["error"]["param"] == param, out
    status, out = post(server["url"] + "/v1/completions", dict(prompt="Hi", max_tokens=5000))
    assert status == 400 and out["error"]["param"] == "max_tokens" and "a sequence holds" in out["error"]["message"]
