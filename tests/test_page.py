"""The page at `/` (runtime/web.py, runtime/static) in a real browser: headless Chromium from
Debian's packages, driven through selenium and chromedriver, against the server run in this
process (uvicorn in a thread on 127.0.0.1) on the tiny model with the tiny flow file.

One browser session: the page loads its modes from /v1/models, answers a message in dynamic mode
(Enter sends), then a second turn of the same conversation in static mode, then one in mode off;
the coloured tokens are read back from the DOM (spans with data-weights) and checked against the
same requests sent directly over HTTP (the text token for token, the weights averaged over
layers); the per-layer heatmaps; a 400 shown to the user; "new chat". A screenshot is saved to
$LORAFLOW_PAGE_SCREENSHOT (`make test-page` writes docs/page.png), else into the test's tmp dir.

Skips when chromium, chromedriver or selenium is missing (`make test-page` installs them).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


def _first(*candidates):
    for c in candidates:
        path = shutil.which(c) or (c if os.path.isabs(c) and os.access(c, os.X_OK) else None)
        if path:
            return path
    return None


CHROMIUM = _first("chromium", "chromium-browser", "google-chrome")
CHROMEDRIVER = _first("chromedriver", "/usr/lib/chromium/chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver, or "
                "`make test-page`)", allow_module_level=True)
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:
    pytest.skip("selenium is not installed (pip install selenium: the `test` extra)", allow_module_level=True)

from tiny_flow import NAMES, build_tiny_flow  # noqa: E402

HOST = "127.0.0.1"
WAIT = 90          # seconds for the page to do one thing (an answer of the tiny model takes about one)
MAX_TOKENS = 12
FIRST, SECOND, THIRD = "Tell me about the sea", "And the sky?", "Thanks"


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    """(base URL, n_layer) of create_app + add_page on the tiny flow model, in a thread here."""
    pytest.importorskip("llama_cpp")
    from loraflow.runtime import FlowLlama
    from loraflow.runtime.server import create_app
    from loraflow.runtime.web import add_page

    tm = tiny_models.get("llama")
    flow = build_tiny_flow(tm, tmp_path_factory.mktemp("page"))
    llm = FlowLlama(str(tm.gguf), flow_path=str(flow), n_ctx=2048, n_threads=1, verbose=False)
    app = create_app(llm, "tiny", parallel=2, n_ctx=2048)   # create_app adds the page itself
    add_page(app)  # idempotent
    assert sum(getattr(r, "path", None) == "/" for r in app.router.routes) == 1
    from fixtures import served

    try:
        with served(app, HOST) as url:
            yield url, llm.flow.n_layer
    finally:
        llm.close()


def get_json(url):
    with urllib.request.urlopen(url, timeout=WAIT) as r:
        return json.loads(r.read())


def stream_chat(url, body):
    """A streamed chat request sent as the page sends it: (answer text, [(token text, mean
    weights or None)], whether the chunks carried flow_trace)."""
    body = dict(body, stream=True, flow_trace="layers", temperature=0.0, max_tokens=MAX_TOKENS)
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    text, tokens, traced = "", [], False
    with urllib.request.urlopen(req, timeout=WAIT) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            choice = chunk["choices"][0]
            text += (choice.get("delta") or {}).get("content") or ""
            trace = choice.get("flow_trace")
            if trace is not None:
                traced = True
                for t in trace["tokens"]:
                    w = t["weights"]
                    tokens.append((t["text"], None if w is None else [sum(col) / len(w) for col in zip(*w)]))
    return text, tokens, traced


def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1000,700", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    # the page itself 1000 x 700 (the window's size counts the headless browser's own bars too)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1000, "height": 700, "deviceScaleFactor": 1, "mobile": False})
    return driver


READ_ANSWER = """
const msgs = document.querySelectorAll('.msg.assistant[data-state=done]');
const m = msgs[arguments[0]];
return {content: m.dataset.content, traced: m.dataset.traced, shown: m.querySelector('.body').textContent,
        tokens: Array.from(m.querySelectorAll('.tok')).map(s => ({text: s.textContent,
            weights: JSON.parse(s.dataset.weights), colour: s.style.backgroundColor}))};
"""


def test_page_chats_and_colours_tokens(served, tmp_path):
    url, n_layer = served
    flow = get_json(url + "/v1/models")["data"][0]["flow"]
    assert flow["adapters"] == NAMES
    k = len(NAMES)
    # the answers the page must show: the same conversation sent directly
    history = [{"role": "user", "content": FIRST}]
    ref1 = stream_chat(url, dict(messages=history, flow_mode="dynamic"))
    history += [{"role": "assistant", "content": ref1[0]}, {"role": "user", "content": SECOND}]
    ref2 = stream_chat(url, dict(messages=history, flow_mode="static", flow_weights=[0.3, 0.7]))
    history += [{"role": "assistant", "content": ref2[0]}, {"role": "user", "content": THIRD}]
    ref3 = stream_chat(url, dict(messages=history, flow_mode="off"))
    assert ref1[2] and ref2[2] and ref3[2], "the server's chunks carry no flow_trace"
    assert ref1[0] and ref2[0], "the tiny model answered nothing"

    driver = browser(tmp_path)
    try:
        wait = WebDriverWait(driver, WAIT)
        driver.get(url + "/")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        mode = Select(driver.find_element(By.ID, "mode"))
        assert [o.get_attribute("value") for o in mode.options] == flow["modes"]
        legend = driver.find_element(By.ID, "legend").text
        assert all(name in legend for name in NAMES), legend
        # everything the page loaded came from the server itself (it must work offline)
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert resources and all(r.startswith(url + "/") for r in resources), resources

        for field, value in (("temperature", "0"), ("max-tokens", str(MAX_TOKENS))):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        weights = driver.find_element(By.ID, "weights")
        assert not weights.is_displayed()   # only in mode static

        def say(text, n_done):
            box = driver.find_element(By.ID, "input")
            box.send_keys(text)
            box.send_keys(Keys.ENTER)       # Enter sends
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done]")) == n_done)
            return driver.execute_script(READ_ANSWER, n_done - 1)

        def check(answer, ref, expect=None):
            ref_text, ref_tokens, _ = ref
            assert answer["content"] == ref_text
            assert answer["shown"] == ref_text
            tokens = answer["tokens"]
            assert answer["traced"] == "1" and 1 <= len(tokens) <= MAX_TOKENS
            assert "".join(t["text"] for t in tokens) == answer["content"]
            assert [t["text"] for t in tokens] == [t for t, _ in ref_tokens]
            for t, (_, ref_w) in zip(tokens, ref_tokens):
                if expect == "off":
                    assert t["weights"] is None and t["colour"] == ""
                    continue
                w = t["weights"]
                assert len(w) == k and all(math.isfinite(x) for x in w), t
                assert w == pytest.approx(ref_w, abs=1e-5)
                assert t["colour"].startswith("rgb("), t
                if expect is not None:
                    assert w == pytest.approx(expect, abs=1e-4)

        mode.select_by_value("dynamic")
        check(say(FIRST, 1), ref1)
        mode.select_by_value("static")
        assert weights.is_displayed()
        weights.clear()
        weights.send_keys("0.3,0.7")
        check(say(SECOND, 2), ref2, expect=[0.3, 0.7])   # the answer of the whole conversation

        # the per-layer heatmap of the first answer: one canvas per adapter, layers x tokens
        button = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant button.layers")[0]
        button.click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "canvas.heatmap")) == k)
        maps = driver.find_elements(By.CSS_SELECTOR, "canvas.heatmap")
        assert [c.get_attribute("data-adapter") for c in maps] == NAMES
        for c in maps:
            assert int(c.get_attribute("data-layers")) == n_layer
            assert int(c.get_attribute("data-tokens")) == len(ref1[1])
        assert button.get_attribute("aria-expanded") == "true"

        shot = Path(os.environ.get("LORAFLOW_PAGE_SCREENSHOT") or tmp_path / "page.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(shot))

        mode.select_by_value("off")
        check(say(THIRD, 3), ref3, expect="off")

        # a 400 is shown to the user; the turn is taken back and the text stays in the box
        mode.select_by_value("static")
        weights.clear()
        weights.send_keys("1,2,3")
        box = driver.find_element(By.ID, "input")
        box.send_keys("Once more" + Keys.ENTER)
        error = driver.find_element(By.ID, "error")
        wait.until(lambda d: error.is_displayed())
        assert "400" in error.text and "flow_weights" in error.text, error.text
        assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.user")) == 3
        assert box.get_attribute("value") == "Once more"

        driver.find_element(By.ID, "new-chat").click()
        assert driver.find_elements(By.CSS_SELECTOR, ".msg") == [] and not error.is_displayed()

        # no script errors (the 400 itself is logged by Chromium as a failed resource)
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and " 400 " not in e["message"]]
        assert severe == [], severe
    finally:
        driver.quit()
