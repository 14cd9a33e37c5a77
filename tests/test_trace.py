"""`loraflow trace` and loraflow.runtime.trace: the fusion weights of every layer at every
token of a prompt and its continuation, as a picture, CSV and JSON, equal to what
FlowLlama.gate_weights() records for the same tokens."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from click.testing import CliRunner  # noqa: E402
from tiny_flow import NAMES, build_tiny_flow  # noqa: E402

from loraflow.cli import main  # noqa: E402
from loraflow.errors import LoraFlowError  # noqa: E402

PROMPT = "Why is the sky blue?"


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    from loraflow.runtime import FlowLlama

    tm = tiny_models.get("llama")
    flow = build_tiny_flow(tm, tmp_path_factory.mktemp("trace"))
    llm = FlowLlama(str(tm.gguf), flow_path=str(flow), n_ctx=512, n_threads=1, verbose=False)
    yield dict(base=str(tm.gguf), flow=str(flow), llm=llm, n_layer=tm.n_layer)
    llm.close()


def assert_not_blank(png):
    import matplotlib.image as mpimg

    img = mpimg.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    colours = np.unique(img.reshape(-1, img.shape[2]), axis=0)
    assert len(colours) > 50, f"{png}: only {len(colours)} colours"


def test_trace_command(setup, tmp_path):
    from loraflow.runtime import FlowLlama

    png, csv_path, json_path = tmp_path / "out" / "trace.png", tmp_path / "trace.csv", tmp_path / "trace.json"
    r = CliRunner().invoke(main, ["trace", "-m", setup["base"], "-f", setup["flow"], "-p", PROMPT, "-o", str(png),
                                  "--csv", str(csv_path), "--json", str(json_path), "--max-tokens", "8",
                                  "--threads", "1", "--ctx", "512"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert f"wrote {png}" in r.stdout
    assert_not_blank(png)

    data = json.loads(json_path.read_text())
    tokens, texts, n_prompt = data["tokens"], data["texts"], data["n_prompt"]
    assert data["adapters"] == NAMES and data["mode"] == "dynamic"
    assert len(tokens) == len(texts) == n_prompt + 8  # the tiny model does not stop early
    # the continuation is the model's own greedy answer (chat template by default)
    llm = setup["llm"]
    llm.set_mode("dynamic")
    answer = llm.create_chat_completion([{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0.0)
    assert "".join(texts[n_prompt:]) == answer["choices"][0]["message"]["content"]

    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["position", "token", "layer", *NAMES]
    rows = rows[1:]
    n_layer = setup["n_layer"]
    assert len(rows) == len(tokens) * n_layer
    # a token's newline is written \n, so that every row is one line of the file
    assert [r[1] for r in rows[::n_layer]] == [t.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
                                              for t in texts]
    assert any("\n" in t for t in texts) and len(csv_path.read_text().splitlines()) == len(rows) + 1
    assert [(int(r[0]), int(r[2])) for r in rows] == [(p, l) for p in range(len(tokens)) for l in range(n_layer)]
    from_csv = np.array([[float(x) for x in r[3:]] for r in rows], dtype=np.float32).reshape(len(tokens), n_layer, 2)
    np.testing.assert_array_equal(np.array(data["weights"], dtype=np.float32), from_csv)

    # the same tokens through a fresh FlowLlama, recording: the very same weights
    fresh = FlowLlama(setup["base"], flow_path=setup["flow"], n_ctx=512, n_threads=1, verbose=False,
                      record_gates=True)
    try:
        fresh.eval(tokens)
        ref = fresh.gate_weights()
    finally:
        fresh.close()
    assert ref.shape == from_csv.shape
    np.testing.assert_allclose(from_csv, ref, rtol=0, atol=1e-6)
    # and they move from token to token and from layer to layer
    assert from_csv.std(axis=0).min() > 1e-3
    assert np.abs(np.diff(from_csv, axis=1)).max() > 1e-3


def test_trace_python_api(setup):
    from loraflow.runtime.trace import Trace, trace

    llm = setup["llm"]
    llm.set_mode("dynamic")
    t = trace(llm, "The weather today", max_tokens=5, chat=False)
    assert isinstance(t, Trace) and t.names == NAMES
    assert t.tokens[:t.n_prompt] == llm.tokenize(b"The weather today", add_bos=True)
    assert t.weights.shape == (t.n_prompt + 5, setup["n_layer"], 2)
    assert "".join(t.texts[t.n_prompt:]) == llm.create_completion(
        "The weather today", max_tokens=5, temperature=0.0)["choices"][0]["text"]
    # the recording state and the gate log are left as they were
    assert not llm.recording and llm.gate_weights().shape[0] == 0


def test_trace_static_mode_and_picture(setup, tmp_path):
    from loraflow.runtime.trace import trace

    llm = setup["llm"]
    llm.set_mode("static", [0.25, 0.75])
    try:
        t = trace(llm, "Hi", max_tokens=3, chat=False)
    finally:
        llm.set_mode("dynamic")
    assert t.mode == "static"
    np.testing.assert_array_equal(t.weights, np.broadcast_to([0.25, 0.75], t.weights.shape))
    t.plot(tmp_path / "static.png")  # constant weights still draw
    assert_not_blank(tmp_path / "static.png")


def test_trace_refuses_off(setup, tmp_path):
    from loraflow.runtime.trace import trace

    llm = setup["llm"]
    llm.set_mode("off")
    try:
        with pytest.raises(LoraFlowError, match="off"):
            trace(llm, "Hi", max_tokens=2)
    finally:
        llm.set_mode("dynamic")
    r = CliRunner().invoke(main, ["trace", "-m", setup["base"], "-f", setup["flow"], "-p", "Hi", "--mode", "off",
                                  "-o", str(tmp_path / "x.png"), "--threads", "1"])
    assert r.exit_code == 1 and "error: mode 'off' fuses nothing" in r.stderr
