"""One Mode from the edge to C: parsed and checked once (loraflow.modes), the mode integers in
one table that agrees with llama-flow.h, errors that name their field, static.json files whose
adapter names are checked, and a served request whose mode is resolved exactly once."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from loraflow.modes import Mode, ModeError, parse_weights
from loraflow.schema import MODES

NAMES, N_LAYER = ["lang", "math"], 3
HEADER = Path(__file__).resolve().parents[1] / "runtime" / "native" / "src" / "llama-flow.h"


def resolve(name, weights=None, names=NAMES):
    return Mode.resolve(name, weights, names=names, n_layer=N_LAYER)


def test_mode_integers_agree_with_the_c_header():
    enum = {m.group(1).lower(): int(m.group(2))
            for m in re.finditer(r"LLAMA_FLOW_MODE_([A-Z]+)\s*=\s*(\d+)", HEADER.read_text())}
    assert enum == MODES


def test_resolved_modes():
    assert resolve("dynamic").kind == "dynamic" and resolve("dynamic").weights is None
    assert resolve("off").code == MODES["off"]
    average = resolve("average")
    assert average.kind == "static" and average.weights.shape == (N_LAYER, 2) and np.all(average.weights == 0.5)
    single = resolve("single:math")
    assert single.weights.tolist() == [[0.0, 1.0]] * N_LAYER and single.describe() == "single:math"
    static = resolve("static", "0.3,0.7")
    assert static.weights.dtype == np.float32 and static.describe() == "static 0.3,0.7"
    per_layer = resolve("static", [[1, 0], [0, 1], [0.5, 0.5]])
    assert per_layer.describe() == "static 1,0;0,1;0.5,0.5"
    # weights alone mean static, as HTTP's flow_weights alone does; nothing means dynamic
    assert resolve(None, [0.3, 0.7]).key == static.key
    assert resolve(None).name == "dynamic"
    # equal numbers, equal keys (the batch engine reuses a KV cache across them); else not
    assert resolve("average").key == resolve("static", "0.5,0.5").key
    assert resolve("single:lang").key != single.key != resolve("dynamic").key
    with pytest.raises(ValueError):  # the weights travel unchanged: nobody may write into them
        static.weights[0, 0] = 1.0


@pytest.mark.parametrize("name, weights, field, fragment", [
    ("bogus", None, "mode", "unknown mode 'bogus'"),
    ("", None, "mode", "non-empty"),
    ("single:nope", None, "mode", "no adapter named 'nope'"),
    ("static", None, "weights", "needs weights"),
    ("static", [1, 2, 3], "weights", "shape"),
    ("static", [[1, 2]] * 2, "weights", "shape"),
    ("static", "x,y", "weights", "numbers"),
    ("static", "1,2;3", "weights", "same number"),
    ("static", [float("nan"), 1.0], "weights", "finite"),
    ("dynamic", [0.5, 0.5], "weights", "takes no weights"),
    ("average", "0.5,0.5", "weights", "takes no weights"),
])
def test_errors_name_their_field(name, weights, field, fragment):
    with pytest.raises(ModeError) as e:
        resolve(name, weights)
    assert e.value.field == field and fragment in str(e.value), str(e.value)


def test_no_adapter_runs_off_only():
    assert resolve("off", names=[]).kind == "off"
    with pytest.raises(ModeError, match="needs a flow adapter") as e:
        resolve("dynamic", names=[])
    assert e.value.field == "mode"


def test_static_json_names_are_checked(tmp_path):
    good = tmp_path / "static.json"
    good.write_text(json.dumps({"fusion": "static", "adapters": NAMES, "weights": [0.2, 0.8]}))
    assert resolve("static", str(good)).weights[0].tolist() == pytest.approx([0.2, 0.8])
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps({"adapters": NAMES[::-1], "weights": [0.2, 0.8]}))
    with pytest.raises(ModeError, match=r"for adapters \[math, lang\], this flow file's are \[lang, math\]"):
        resolve("static", str(swapped))
    bare = tmp_path / "bare.json"                # a plain list: nothing to check the names against
    bare.write_text("[0.2, 0.8]")
    assert resolve("static", str(bare)).weights.shape == (N_LAYER, 2)


def test_a_mistyped_path_is_no_such_file(tmp_path):
    with pytest.raises(ModeError, match="no such static weights file") as e:
        parse_weights(str(tmp_path / "statc.json"))
    assert e.value.field == "weights"
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ModeError, match="expected a static.json"):
        parse_weights(str(broken))
    # over HTTP a string is numbers only: the server reads no file a request names
    with pytest.raises(ModeError, match="numbers"):
        parse_weights(str(broken), files=False)


# -- a served request resolves its mode once ---------------------------------------------------

@pytest.fixture(scope="module")
def llm(tiny_models, tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("llama_cpp")
    from tiny_flow import build_tiny_flow

    from loraflow.runtime import FlowLlama

    tm = tiny_models.get("llama")
    flow = build_tiny_flow(tm, tmp_path_factory.mktemp("modes"))
    llm = FlowLlama(str(tm.gguf), flow_path=str(flow), n_ctx=512, n_threads=2, verbose=False)
    yield llm
    llm.close()


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("parallel", [1, 2])
def test_a_request_resolves_its_mode_once(llm, monkeypatch, parallel):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from loraflow.runtime.server import create_app

    calls = []
    real = Mode.resolve.__func__

    def counting(cls, *args, **kwargs):
        calls.append(args[0])
        return real(cls, *args, **kwargs)

    app = create_app(llm, "tiny", parallel=parallel)
    monkeypatch.setattr(Mode, "resolve", classmethod(counting))   # after the server's own default
    from fixtures import served

    with served(app) as base:
        url = base + "/v1/completions"
        for body, resolves in [(dict(flow_mode="static", flow_weights=[0.3, 0.7]), 1),
                               (dict(flow_mode="single:math"), 1), (dict(), 0),
                               (dict(flow_mode="single:nope"), 1)]:
            calls.clear()
            status, out = post(url, dict(prompt="One two", max_tokens=3, temperature=0.0, **body))
            assert status == (400 if "nope" in str(body) else 200), out
            assert len(calls) == resolves, (body, calls)
