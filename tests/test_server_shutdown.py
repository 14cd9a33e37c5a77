"""`loraflow serve` stops gracefully: on SIGTERM (or Ctrl-C, SIGINT) it answers new requests
503 with an OpenAI-style error body, lets the running ones finish within --shutdown-timeout,
then ends the streams still open with an error event and [DONE]; nothing hangs, and the process
exits 0. The real server in a subprocess, on the tiny model."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")

from test_server import REQUEST_TIMEOUT, post, sse_events, start_server, stop_server  # noqa: E402
from tiny_flow import build_tiny_flow  # noqa: E402

TIMEOUT = 3.0      # --shutdown-timeout
MARGIN = 15.0      # seconds on top of it for the process to end (a loaded machine)


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory):
    tm = tiny_models.get("llama")
    return str(tm.gguf), str(build_tiny_flow(tm, tmp_path_factory.mktemp("shutdown")))


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT) as r:
            return r.status, json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


@pytest.mark.parametrize("parallel", [1, 4], ids=["one-at-a-time", "parallel-4"])
def test_sigterm_refuses_new_requests_then_ends_the_streams(files, tmp_path, parallel):
    proc, url = start_server(*files, tmp_path / "server.log", parallel=parallel, ctx=16384,
                             extra=["--shutdown-timeout", str(TIMEOUT)])
    try:
        # well over TIMEOUT seconds of tokens (the tiny model makes ~1000 a second): still running
        status, resp = post(url + "/v1/completions", dict(prompt="Count", max_tokens=16000, temperature=0.0,
                                                          ignore_eos=True, stream=True), stream=True)
        assert status == 200
        events = sse_events(resp)
        assert json.loads(next(events))["choices"][0]["text"] is not None
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        time.sleep(0.3)
        status, out = post(url + "/v1/completions", dict(prompt="Hi", max_tokens=2))
        assert status == 503, out
        assert out["error"]["code"] == "shutting_down" and out["error"]["message"], out
        assert get(url + "/health")[0] == 503
        rest = list(events)                      # the stream goes on until the time is up, then ends
        assert rest[-1] == "[DONE]", rest[-3:]
        last = json.loads(rest[-2])
        assert "error" in last and last["error"]["code"] == "shutting_down", last
        assert time.monotonic() - t0 >= TIMEOUT - 0.5, "the running request did not get its time"
        assert proc.wait(timeout=TIMEOUT + MARGIN) == 0
        assert time.monotonic() - t0 < TIMEOUT + MARGIN
    finally:
        stop_server(proc)


def test_ctrl_c_lets_the_running_request_finish(files, tmp_path):
    proc, url = start_server(*files, tmp_path / "server.log", parallel=4, extra=["--shutdown-timeout", "60"])
    try:
        status, resp = post(url + "/v1/completions", dict(prompt="Count", max_tokens=200, temperature=0.0,
                                                          ignore_eos=True, stream=True), stream=True)
        assert status == 200
        events = sse_events(resp)
        next(events)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        rest = [json.loads(e) for e in events if e != "[DONE]"]
        assert rest[-1]["choices"][0]["finish_reason"] == "length", rest[-1]   # it ran to its end
        assert proc.wait(timeout=MARGIN) == 0
        assert time.monotonic() - t0 < 30, "the server waited for its whole timeout with nothing running"
    finally:
        stop_server(proc)
