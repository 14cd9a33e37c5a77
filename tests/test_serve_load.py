"""`loraflow serve --parallel 8` under load, on loopback: 300 requests, 16 at a time, in six
fusion modes; 10% malformed (bad mode, bad weights, bad JSON, too long for the context), 10%
leaving in the middle of their stream. Every good answer equals the one FlowLlama gives alone,
every bad request gets a 400 naming its field, and afterwards no slot is busy, nothing is
queued, the KV cache holds no more than the slots' last requests, the server's memory has not
grown and it still answers."""

from __future__ import annotations

import json
import random
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")

from test_server import REQUEST_TIMEOUT, post, sse_events, start_server, stop_server  # noqa: E402
from tiny_flow import build_tiny_flow  # noqa: E402

N_REQUESTS, CONCURRENCY, PARALLEL, CTX = 300, 16, 8, 256
MODES = [("dynamic", None), ("single:math", None), ("single:lang", None), ("static", [0.2, 0.9]), ("off", None),
         ("average", None)]
PROMPTS = ["The sea is", "Once there was", "Numbers: 1 2 3", "Why do birds", "My favourite food", "In the city"]
BAD = [  # (body or raw bytes, the field the 400 must name)
    (dict(prompt="Hi", max_tokens=4, flow_mode="sideways"), "flow_mode"),
    (dict(prompt="Hi", max_tokens=4, flow_mode="static", flow_weights=[1.0, 2.0, 3.0]), "flow_weights"),
    (b'{"prompt": "Hi", "max_tokens": ', None),
    (dict(prompt="Hi", max_tokens=CTX * 2), "max_tokens"),
]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def health(url):
    with urllib.request.urlopen(url + "/health", timeout=REQUEST_TIMEOUT) as r:
        return json.loads(r.read().decode())


def post_raw(url, data: bytes):
    import urllib.error

    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as r:
            return r.status, json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


@pytest.mark.slow
def test_load(tiny_models, tmp_path):
    from loraflow.runtime import FlowLlama

    tm = tiny_models.get("llama")
    flow = build_tiny_flow(tm, tmp_path)
    llm = FlowLlama(str(tm.gguf), flow_path=str(flow), n_ctx=512, n_threads=1, verbose=False)
    refs = {}
    try:
        for mode, weights in MODES:
            llm.set_mode(mode, weights)
            for prompt in PROMPTS:
                refs[(prompt, mode)] = llm.create_completion(prompt, max_tokens=6, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()

    rng = random.Random(0)
    jobs = []
    for i in range(N_REQUESTS):
        kind = "bad" if i % 10 == 3 else "leave" if i % 10 == 7 else "good"
        jobs.append((kind, rng.choice(PROMPTS), *rng.choice(MODES), BAD[i % len(BAD)]))
    proc, url = start_server(str(tm.gguf), str(flow), tmp_path / "server.log", parallel=PARALLEL, ctx=CTX, threads=2)
    try:
        def run(job):
            kind, prompt, mode, weights, bad = job
            if kind == "bad":
                body, param = bad
                status, out = post_raw(url + "/v1/completions", body) if isinstance(body, bytes) else \
                    post(url + "/v1/completions", body)
                return kind, (status, out.get("error", {}).get("param"), param, out)
            body = dict(prompt=prompt, max_tokens=6 if kind == "good" else 200, temperature=0.0, flow_mode=mode,
                        stream=kind == "leave")
            if weights:
                body["flow_weights"] = weights
            if kind == "leave":
                status, resp = post(url + "/v1/completions", body, stream=True)
                events = sse_events(resp)
                next(events)
                resp.close()  # gone in the middle of the stream
                return kind, (status,)
            status, out = post(url + "/v1/completions", body)
            return kind, (status, out["choices"][0]["text"] if status == 200 else out, refs[(prompt, mode)])

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            warm = list(pool.map(run, jobs[:50]))
            rss_warm = rss_kb(proc.pid)
            rest = list(pool.map(run, jobs[50:]))
        for (kind, result), job in zip(warm + rest, jobs):
            if kind == "good":
                status, text, ref = result
                assert status == 200 and text == ref, (job, result)
            elif kind == "bad":
                status, got, want, out = result
                assert status == 400, (job, out)
                if want is not None:
                    assert got == want, (job, out)
            else:
                assert result[0] == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (h := health(url))["slots_busy"] + h["queued"] > 0:
            time.sleep(0.2)
        h = health(url)
        assert h["slots_busy"] == 0 and h["queued"] == 0, h
        assert h["kv_tokens"] <= PARALLEL * CTX, h  # each slot keeps at most its last request
        assert h["requests"] == N_REQUESTS - sum(k == "bad" for k, *_ in jobs), h  # the bad ones never queue
        growth = rss_kb(proc.pid) - rss_warm
        assert growth < 64 * 1024, f"the server's memory grew by {growth} kB over {N_REQUESTS - 50} requests"
        status, out = post(url + "/v1/completions", dict(prompt=PROMPTS[0], max_tokens=6, temperature=0.0))
        assert status == 200 and out["choices"][0]["text"] == refs[(PROMPTS[0], "dynamic")]
        assert proc.poll() is None
    finally:
        stop_server(proc)
