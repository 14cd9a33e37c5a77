"""`loraflow serve` end to end: the real server in a subprocess on 127.0.0.1 (a free port),
a tiny llama model with a tiny flow file, and a real HTTP client (urllib, and the `openai`
client); one request at a time (--parallel 1 --logits-all) and batched (--parallel 4, the
default), the same tests for both. Answers are checked against FlowLlama run in this process
with the same greedy settings: text, logprobs (llama-cpp-python's own, with logits_all=True),
grammars, sampling options and the gate weights FlowLlama records."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
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


def start_server(base, flow, log_path, parallel=1, ctx=4096, threads=1, extra=()):
    """Start `loraflow serve`; return (process, base URL) once /health answers."""
    for _ in range(3):  # another process may grab the free port first
        port = free_port()
        log = open(log_path, "w")
        proc = subprocess.Popen(loraflow_cmd() + ["serve", "-m", base, "-f", flow, "--host", HOST, "--port", str(port),
                                                  "--threads", str(threads), "--ctx", str(ctx), "--log-level",
                                                  "warning", "--parallel", str(parallel), *extra],
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
    extra = ["--logits-all"] if request.param == 1 else []
    proc, url = start_server(str(tm.gguf), str(flow), work / "server.log", parallel=request.param, extra=extra)
    # recording from the start (FlowLlama.record_gates on a context that decoded without it can
    # record garbage: see BatchEngine._set_recording)
    llm = FlowLlama(str(tm.gguf), flow_path=str(flow), n_ctx=512, n_threads=1, verbose=False, record_gates=True)
    llm_all = FlowLlama(str(tm.gguf), flow_path=str(flow), n_ctx=512, n_threads=1, verbose=False, logits_all=True)
    try:
        yield dict(url=url, llm=llm, llm_all=llm_all, proc=proc, log=work / "server.log", parallel=request.param)
    finally:
        llm.close()
        llm_all.close()
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


def test_what_cannot_run_is_refused(server):
    if server["parallel"] == 1:
        pytest.skip("one at a time, llama-cpp-python shortens max_tokens to what the context holds")
    status, out = post(server["url"] + "/v1/completions", dict(prompt="Hi", max_tokens=5000))
    assert status == 400 and out["error"]["param"] == "max_tokens", out


# -- every feature on both paths ---------------------------------------------------------------------

PROMPT = "The weather today"


def close(a, b, rel=1e-4, abs_=1e-5):
    return a is None and b is None or (a is not None and b is not None and abs(a - b) <= abs_ + rel * abs(b))


def check_completion_logprobs(got, want):
    assert got["tokens"] == want["tokens"]
    assert got["text_offset"] == want["text_offset"]
    assert all(close(a, b) for a, b in zip(got["token_logprobs"], want["token_logprobs"])), (got, want)
    assert len(got["token_logprobs"]) == len(want["token_logprobs"])
    for g, w in zip(got["top_logprobs"], want["top_logprobs"]):
        assert (g is None) == (w is None)
        if g is not None:
            assert set(g) == set(w), (g, w)
            assert all(close(g[k], w[k]) for k in w), (g, w)


def test_logprobs_completion(server):
    """logprobs=3: llama-cpp-python's own (FlowLlama with logits_all=True), on both paths."""
    llm = server["llm_all"]
    llm.set_mode("dynamic")
    ref = llm.create_completion(PROMPT, max_tokens=8, temperature=0.0, logprobs=3)["choices"][0]
    status, out = post(server["url"] + "/v1/completions", dict(prompt=PROMPT, max_tokens=8, temperature=0.0,
                                                                logprobs=3))
    assert status == 200, out
    choice = out["choices"][0]
    assert choice["text"] == ref["text"]
    check_completion_logprobs(choice["logprobs"], ref["logprobs"])
    assert all(len(top) == 4 or len(top) == 3 for top in choice["logprobs"]["top_logprobs"])


def test_logprobs_chat(server):
    llm = server["llm_all"]
    llm.set_mode("single:math")
    ref = llm.create_chat_completion(MESSAGES, max_tokens=6, temperature=0.0, logprobs=True,
                                     top_logprobs=2)["choices"][0]
    status, out = post(server["url"] + "/v1/chat/completions",
                       dict(messages=MESSAGES, max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=2,
                            flow_mode="single:math"))
    assert status == 200, out
    choice = out["choices"][0]
    assert choice["message"]["content"] == ref["message"]["content"]
    got, want = choice["logprobs"]["content"], ref["logprobs"]["content"]
    assert [g["token"] for g in got] == [w["token"] for w in want] and len(got) == 6
    for g, w in zip(got, want):
        assert close(g["logprob"], w["logprob"]), (g, w)
        assert {t["token"] for t in g["top_logprobs"]} == {t["token"] for t in w["top_logprobs"]}
    # logprobs: true alone (OpenAI's way) gives each token's logprob, with no alternatives
    status, out = post(server["url"] + "/v1/chat/completions",
                       dict(messages=MESSAGES, max_tokens=3, temperature=0.0, logprobs=True))
    assert status == 200 and len(out["choices"][0]["logprobs"]["content"]) == 3, out


def log_softmax(row):
    row = np.asarray(row, dtype=np.float64)
    m = row.max()
    return row - m - math.log(np.exp(row - m).sum())


def test_echo(server):
    """echo: the prompt before the answer; with logprobs, every prompt token's after the first
    (null), each from the row before it."""
    llm = server["llm_all"]
    llm.set_mode("dynamic")
    text = llm.create_completion(PROMPT, max_tokens=5, temperature=0.0)["choices"][0]["text"]
    status, out = post(server["url"] + "/v1/completions", dict(prompt=PROMPT, max_tokens=5, temperature=0.0,
                                                                echo=True))
    assert status == 200 and out["choices"][0]["text"] == PROMPT + text, out
    status, out = post(server["url"] + "/v1/completions", dict(prompt=PROMPT, max_tokens=5, temperature=0.0,
                                                                echo=True, logprobs=1))
    assert status == 200, out
    lp = out["choices"][0]["logprobs"]
    prompt_ids = llm.tokenize(PROMPT.encode(), special=True)
    gen_ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    ids = prompt_ids + gen_ids
    rows = llm.eval_logits(ids)
    assert lp["tokens"] == [llm.detokenize([t]).decode("utf-8", errors="ignore") for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        assert close(lp["token_logprobs"][i], float(log_softmax(rows[i - 1])[ids[i]])), i
    assert lp["text_offset"][0] == 0 and lp["text_offset"][len(prompt_ids)] == len(PROMPT)


SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]}, "sure": {"type": "boolean"},
                                            "count": {"type": "integer"}},
          "required": ["answer", "sure", "count"], "additionalProperties": False}


def valid(obj) -> bool:
    return (isinstance(obj, dict) and set(obj) == {"answer", "sure", "count"} and obj["answer"] in ("yes", "no", "maybe")
            and isinstance(obj["sure"], bool) and isinstance(obj["count"], int) and not isinstance(obj["count"], bool))


@pytest.mark.parametrize("form", ["openai", "llama-cpp-python", "json_object"])
def test_response_format(server, form):
    """OpenAI's json_schema form and llama-cpp-python's json_object with a schema: text that
    parses and fits the schema, and llama-cpp-python's own answer with its form; json_object
    alone: any JSON."""
    llm = server["llm"]
    llm.set_mode("dynamic")
    theirs = {"type": "json_object", "schema": SCHEMA} if form != "json_object" else {"type": "json_object"}
    ours = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}} \
        if form == "openai" else theirs
    ref = llm.create_chat_completion(MESSAGES, max_tokens=48, temperature=0.0, response_format=theirs)
    ref = ref["choices"][0]["message"]["content"]
    status, out = post(server["url"] + "/v1/chat/completions",
                       dict(messages=MESSAGES, max_tokens=48, temperature=0.0, response_format=ours))
    assert status == 200, out
    content = out["choices"][0]["message"]["content"]
    assert content == ref
    if form != "json_object":
        assert valid(json.loads(content)), content
    elif out["choices"][0]["finish_reason"] == "stop":
        json.loads(content)


def sampling_cases(llm):
    greedy = llm.create_completion(PROMPT, max_tokens=12, temperature=0.0)["choices"][0]["text"]
    first = llm.tokenize(greedy.encode(), add_bos=False, special=True)[0]
    return {
        "seed": dict(temperature=0.9, top_k=20, top_p=0.9, seed=7),
        "stop": dict(temperature=0.0, stop=[greedy[len(greedy) // 2:][:2]]),
        "penalties": dict(temperature=0.0, repeat_penalty=1.5, presence_penalty=0.7, frequency_penalty=0.6),
        "logit_bias": dict(temperature=0.0, logit_bias={str(first): -100.0, "300": 5.0}),
    }


@pytest.mark.parametrize("case", ["seed", "stop", "penalties", "logit_bias"])
def test_sampling_options(server, case):
    llm = server["llm"]
    llm.set_mode("dynamic")
    body = sampling_cases(llm)[case]
    kw = dict(body)
    if "logit_bias" in kw:
        kw["logit_bias"] = {int(k): v for k, v in kw["logit_bias"].items()}
    ref = llm.create_completion(PROMPT, max_tokens=12, **kw)["choices"][0]
    status, out = post(server["url"] + "/v1/completions", dict(prompt=PROMPT, max_tokens=12, **body))
    assert status == 200, out
    assert out["choices"][0]["text"] == ref["text"] and out["choices"][0]["finish_reason"] == ref["finish_reason"]
    if case == "seed":  # the same seed, the same answer
        assert post(server["url"] + "/v1/completions", dict(prompt=PROMPT, max_tokens=12, **body))[1] == out or \
            post(server["url"] + "/v1/completions", dict(prompt=PROMPT, max_tokens=12, **body))[1]["choices"][0][
                "text"] == ref["text"]


def traced(llm, tokens, mode, weights, n):
    """FlowLlama alone, greedy, gates recorded: (generated ids, the rows that predicted them)."""
    assert llm.recording
    llm.set_mode(mode, weights)
    llm.clear_gate_log()
    from loraflow.gate_training.evaluate import generate_runtime

    try:
        out = generate_runtime(llm, [tokens], n)[0]
        gates = llm.gate_weights()
    finally:
        llm.clear_gate_log()
        llm.set_mode("dynamic")
    return out, gates[len(tokens) - 1: len(tokens) - 1 + len(out)]


def trace_of_stream(events):
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    traces = [c["choices"][0]["flow_trace"] for c in chunks if c.get("choices")]
    assert len(traces) == len([c for c in chunks if c.get("choices")]), "every chunk carries its flow_trace"
    head = traces[0]
    return head, [t for tr in traces for t in tr["tokens"]], chunks


@pytest.mark.parametrize("mode, weights, per, stream", [("dynamic", None, "layers", False), ("dynamic", None, "mean", True),
                                                        ("static", [0.2, 0.9], "mean", False), ("off", None, "layers", True)])
def test_flow_trace_completion(server, mode, weights, per, stream):
    """flow_trace: every generated token with the weights the gate computed at the position that
    predicted it, as FlowLlama records them."""
    llm = server["llm"]
    tokens = llm.tokenize(PROMPT.encode(), special=True)
    ids, gates = traced(llm, tokens, mode, weights, 8)
    body = dict(prompt=PROMPT, max_tokens=8, temperature=0.0, flow_mode=mode, stream=stream,
                flow_trace=True if per == "mean" else per)
    if weights:
        body["flow_weights"] = weights
    status, out = post(server["url"] + "/v1/completions", body, stream=stream)
    assert status == 200, out
    if stream:
        head, toks, chunks = trace_of_stream(list(sse_events(out)))
        text = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
    else:
        head = out["choices"][0]["flow_trace"]
        toks, text = head["tokens"], out["choices"][0]["text"]
    assert head["adapters"] == ["lang", "math"] and head["n_layer"] == 2 and head["per"] == per
    assert [t["id"] for t in toks] == ids
    assert "".join(t["text"] for t in toks) == text
    for t, g in zip(toks, gates):
        if mode == "off":
            assert t["weights"] is None
            continue
        want = g if per == "layers" else g.mean(axis=0)
        assert np.allclose(np.array(t["weights"]), want, rtol=0, atol=1e-5), (t, want)
    if mode == "static":
        assert np.allclose(np.array(toks[0]["weights"]), [0.2, 0.9], atol=1e-6)


def test_flow_trace_streamed_chat(server):
    """What the web page asks: a streamed chat with flow_trace "layers"."""
    from loraflow.runtime.prompts import chat_prompt

    llm = server["llm"]
    tokens = chat_prompt(llm, MESSAGES).tokens
    ids, gates = traced(llm, tokens, "dynamic", None, 10)
    status, resp = post(server["url"] + "/v1/chat/completions",
                        dict(messages=MESSAGES, max_tokens=10, temperature=0.0, stream=True, flow_trace="layers"),
                        stream=True)
    assert status == 200
    head, toks, chunks = trace_of_stream(list(sse_events(resp)))
    assert head["adapters"] == ["lang", "math"] and head["per"] == "layers"
    assert [t["id"] for t in toks] == ids
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert "".join(t["text"] for t in toks) == text
    assert np.allclose(np.array([t["weights"] for t in toks]), gates, rtol=0, atol=1e-5)


def test_stream_usage(server):
    status, resp = post(server["url"] + "/v1/completions",
                        dict(prompt=PROMPT, max_tokens=5, temperature=0.0, stream=True, ignore_eos=True,
                             stream_options={"include_usage": True}), stream=True)
    assert status == 200
    events = list(sse_events(resp))
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5, last


@pytest.mark.parametrize("body, param", [
    (dict(n=2), "n"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (dict(best_of=3), "best_of"),
    (dict(flow_mdoe="dynamic"), "flow_mdoe"),          # a typo is not silently ignored
    (dict(logit_bias={"nope": 1}), "logit_bias"),
    (dict(logit_bias={"99999999": 1}), "logit_bias"),
    (dict(logit_bias={"5": 1000}), "logit_bias"),
    (dict(response_format={"type": "xml"}), "response_format"),
    (dict(response_format={"type": "json_schema"}), "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}), "response_format"),
    (dict(grammar="root ::= ("), "grammar"),
    (dict(flow_trace="sideways"), "flow_trace"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(top_logprobs=50, logprobs=True), "top_logprobs"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
])
def test_unserved_or_bad_fields_are_400(server, body, param):
    status, out = post(server["url"] + "/v1/chat/completions", dict(messages=MESSAGES, max_tokens=2, **body))
    assert status == 400, out
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["param"] == param, out


def scrape(url) -> dict:
    """The samples of /metrics ({name or name{labels}: value}), after checking every sample has
    its # HELP and # TYPE."""
    with urllib.request.urlopen(url + "/metrics", timeout=REQUEST_TIMEOUT) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    helps, types, samples = set(), set(), {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split()[2])
        elif line.startswith("# TYPE "):
            assert line.split()[3] in ("counter", "gauge"), line
            types.add(line.split()[2])
        elif line:
            key, value = line.rsplit(" ", 1)
            assert key.split("{")[0] in helps and key.split("{")[0] in types, line
            samples[key] = float(value)
    return samples


def test_metrics(server):
    url = server["url"]
    before = scrape(url)
    sent = []
    for mode in ("single:math", "dynamic", "dynamic"):
        status, out = post(url + "/v1/completions", dict(prompt=PROMPT, max_tokens=4, temperature=0.0,
                                                         ignore_eos=True, flow_mode=mode, flow_trace=True))
        assert status == 200, out
        sent.append(out["usage"])
    after = scrape(url)
    for mode, n in (("single:math", 1), ("dynamic", 2)):
        key = f'loraflow:requests_total{{mode="{mode}"}}'
        assert after[key] - before.get(key, 0) == n, (key, after)
    assert after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"] == 12
    prompt = sum(u["prompt_tokens"] for u in sent)
    processed = after["llamacpp:prompt_tokens_total"] - before["llamacpp:prompt_tokens_total"]
    cached = after.get("llamacpp:prompt_tokens_cached_total", 0) - before.get("llamacpp:prompt_tokens_cached_total", 0)
    assert processed + cached == prompt, (processed, cached, prompt)
    for name in ("llamacpp:requests_processing", "llamacpp:requests_deferred", "llamacpp:kv_cache_usage_ratio",
                 "llamacpp:predicted_tokens_seconds", "llamacpp:n_decode_total"):
        assert name in after, name
    assert after["llamacpp:requests_processing"] == 0 and after["llamacpp:predicted_tokens_seconds"] > 0
    w = [after[f'loraflow:gate_weight_mean{{adapter="{n}"}}'] for n in ("lang", "math")]
    assert all(math.isfinite(x) for x in w) and after["loraflow:gate_tokens"] >= 8
    with urllib.request.urlopen(url + "/health", timeout=REQUEST_TIMEOUT) as r:   # still JSON
        assert json.loads(r.read().decode())["status"] == "ok"


def test_openai_client(server):
    """The real `openai` client: logprobs, response_format json_schema, and a stream with
    flow_trace (loraflow's field, through extra_body)."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0, timeout=REQUEST_TIMEOUT)
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0.0,
                                         logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == 4 and all(c.logprob <= 0 and len(c.top_logprobs) >= 2 for c in content)
    out = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=48, temperature=0.0,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}})
    assert valid(json.loads(out.choices[0].message.content)), out.choices[0].message.content
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0.0,
                                            stream=True, extra_body={"flow_trace": "mean", "flow_mode": "dynamic"})
    chunks = list(stream)
    traces = [c.choices[0].model_extra["flow_trace"] for c in chunks if c.choices]
    assert traces[0]["adapters"] == ["lang", "math"] and traces[0]["per"] == "mean"
    toks = [t for tr in traces for t in tr["tokens"]]
    assert len(toks) == 6 and all(len(t["weights"]) == 2 for t in toks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "".join(t["text"] for t in toks) == text


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", dict(messages=[{"role": "user"}])),
    ("/v1/chat/completions", dict(messages=[{"content": "hi"}])),
    ("/v1/chat/completions", dict(messages=["hi"])),
    ("/v1/chat/completions", dict(messages=MESSAGES, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}})),
    ("/v1/chat/completions", dict(messages=MESSAGES, response_format="json")),
    ("/v1/chat/completions", dict(messages=MESSAGES, logit_bias={"5": "much"})),
    ("/v1/chat/completions", dict(messages=MESSAGES, stream_options={"include_usage": True, "x": 1}, stream=True)),
    ("/v1/completions", dict(prompt=[10**9])),
    ("/v1/completions", dict(prompt=["a", "b"])),
    ("/v1/completions", dict(prompt="Hi", logprobs=99)),
    ("/v1/completions", dict(prompt="Hi", stop=5)),
])
def test_malformed_requests_are_400_not_500(server, path, body):
    status, out = post(server["url"] + path, dict(max_tokens=2, **body))
    assert status == 400, out
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["message"], out
