"""The batched engine (loraflow.runtime.batch_engine): many requests decoded together, each in
its own fusion mode, with continuous batching, chunked prompts, stop strings, cancellation,
KV-cache prefix reuse, and per request logprobs, gate traces and grammars. Every answer is checked against the same request run alone, greedily, on
FlowLlama (llama-cpp-python's own generation loop)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("torch")

from tiny_flow import NAMES, build_tiny_flow  # noqa: E402

from loraflow.modes import ModeError  # noqa: E402
from loraflow.runtime.batch_engine import BatchEngine, RequestError, Sampling  # noqa: E402

GREEDY = Sampling(temperature=0.0)
MODES = [("dynamic", None), ("static", [0.3, 0.9]), ("average", None), (f"single:{NAMES[0]}", None),
         (f"single:{NAMES[1]}", None), ("off", None)]
PROMPTS = [b"The quick brown fox jumps over", b"One two three", b"Why is the sky blue? Because",
           b"Once upon a time there was a", b"In the beginning", b"A B C D E F G H I J K L M N O P"]


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    from loraflow.runtime import FlowLlama

    tm = tiny_models.get("llama")
    flow = build_tiny_flow(tm, tmp_path_factory.mktemp("engine"), strength=2.0)
    llm = FlowLlama(str(tm.gguf), flow_path=str(flow), n_ctx=512, n_threads=2, verbose=False)
    prompts = [llm.tokenize(p, add_bos=False) for p in PROMPTS]
    yield dict(llm=llm, prompts=prompts)
    llm.close()


def solo(llm, tokens, mode, weights, n):
    """The request alone: FlowLlama's greedy completion in that mode, as token ids."""
    from loraflow.gate_training.evaluate import generate_runtime

    llm.set_mode(mode, weights)
    out = generate_runtime(llm, [tokens], n)[0]
    llm.set_mode("dynamic")
    return out


@pytest.mark.parametrize("n_parallel, n_batch", [(6, 512), (3, 512), (6, 8)], ids=["6-slots", "3-slots", "chunked"])
def test_every_mode_at_once_equals_each_alone(setup, n_parallel, n_batch):
    """Six requests in six modes at once (3 slots: they queue and join as others leave; a batch of
    8 tokens: every prompt is fed in chunks alongside the others' decoding)."""
    llm, prompts = setup["llm"], setup["prompts"]
    refs = [solo(llm, p, mode, w, 12) for p, (mode, w) in zip(prompts, MODES)]
    assert len({tuple(r) for r in refs}) == len(refs), "the modes should answer differently"
    engine = BatchEngine(llm, n_parallel=n_parallel, n_ctx=n_parallel * 128, n_batch=n_batch)
    try:
        requests = [engine.submit(p, mode, w, max_tokens=12, sampling=GREEDY) for p, (mode, w) in zip(prompts, MODES)]
        results = [r.result(timeout=120) for r in requests]
        status = engine.status()
        positions = engine.cache_positions()
    finally:
        engine.close()
    assert all(mine == theirs for mine, theirs in positions), positions  # no cell held that a slot does not know of
    for (mode, _), ref, res in zip(MODES, refs, results):
        assert res.tokens == ref, f"{mode}: batched {res.tokens} != alone {ref}"
        assert res.finish_reason == ("length" if len(ref) == 12 else "stop")
        assert res.text == llm.detokenize(ref).decode("utf-8", errors="replace")
    assert status["slots_busy"] == 0 and status["queued"] == 0 and status["finished"] == len(MODES)


def test_prompts_first_come_first_served(setup):
    """Six requests that arrive together, with room for four prompt tokens per step while others
    wait: prompts are fed in the order they came, so their first tokens come in that order (the
    first does not wait for the others' prompts), and each answer is still its solo answer. A
    request alone is fed whole: one step for its prompt."""
    llm, prompts = setup["llm"], setup["prompts"]
    refs = [solo(llm, p, mode, w, 6) for p, (mode, w) in zip(prompts, MODES)]
    engine = BatchEngine(llm, n_parallel=6, n_ctx=6 * 128, prefill_chunk=4)
    try:
        with engine.lock:  # the engine's thread waits: all six are queued before its first step
            requests = [engine.submit(p, mode, w, max_tokens=6, sampling=Sampling(temperature=0.0, ignore_eos=True))
                        for p, (mode, w) in zip(prompts, MODES)]
        results = [r.result(timeout=120) for r in requests]
        firsts = [r.first_token_step for r in requests]
        steps = engine.status()["decode_steps"]
        lone = engine.submit(prompts[-1], max_tokens=3, sampling=Sampling(temperature=0.0, ignore_eos=True))
        lone.result(timeout=60)
        lone_steps = engine.status()["decode_steps"] - steps
    finally:
        engine.close()
    # prompts of 6, 3, 7, 7, 3 and 16 tokens, 4 a step: the first is done in the second step, the
    # last after all the others
    assert firsts == sorted(firsts) and firsts[0] == 2 and firsts[-1] > 10, firsts
    for (mode, _), ref, res in zip(MODES, refs, results):
        assert res.tokens[:len(ref)] == ref, f"{mode}: batched {res.tokens} != alone {ref}"
    assert len(prompts[-1]) > 4 and lone_steps == 3, f"{len(prompts[-1])} prompt tokens alone took {lone_steps} steps"


def test_stream_stop_and_prefix_reuse(setup):
    llm, prompts = setup["llm"], setup["prompts"]
    engine = BatchEngine(llm, n_parallel=2, n_ctx=256)
    try:
        first = engine.submit(prompts[0], "dynamic", max_tokens=10, sampling=GREEDY)
        pieces = list(first.stream())
        done = first.result()
        assert "".join(pieces) == done.text and done.n_cached == 0
        # the same prompt again, and one that continues it: their prefix comes from the cache
        again = engine.submit(prompts[0], "dynamic", max_tokens=10, sampling=GREEDY).result(timeout=60)
        assert again.tokens == done.tokens and again.n_cached == len(prompts[0]) - 1
        longer = prompts[0] + done.tokens[:3]
        cont = engine.submit(longer, "dynamic", max_tokens=5, sampling=GREEDY).result(timeout=60)
        assert cont.n_cached >= len(prompts[0]) and cont.tokens == done.tokens[3:8]
        # another mode does not reuse states computed in this one
        other = engine.submit(prompts[0], "off", max_tokens=4, sampling=GREEDY).result(timeout=60)
        assert other.n_cached == 0
        # a stop string ends the answer before it
        stop_at = done.text[len(done.text) // 2:][:3]
        cut = engine.submit(prompts[0], "dynamic", max_tokens=10, sampling=GREEDY, stop=[stop_at]).result(timeout=60)
        assert cut.text == done.text[:done.text.index(stop_at)] and cut.finish_reason == "stop"
    finally:
        engine.close()


def test_cancel_frees_the_slot(setup):
    llm, prompts = setup["llm"], setup["prompts"]
    engine = BatchEngine(llm, n_parallel=1, n_ctx=512)
    try:
        long = engine.submit(prompts[0], "dynamic", max_tokens=400, sampling=Sampling(temperature=1.0, seed=1))
        next(iter(long.stream()))
        waiting = engine.submit(prompts[1], "dynamic", max_tokens=4, sampling=GREEDY)
        time.sleep(0.05)
        assert engine.status()["queued"] == 1
        long.cancel()
        assert waiting.result(timeout=60).tokens  # it got the slot
        assert len(long.result().tokens) < 400
    finally:
        engine.close()


def test_requests_that_cannot_run_are_refused(setup):
    llm, prompts = setup["llm"], setup["prompts"]
    engine = BatchEngine(llm, n_parallel=2, n_ctx=64)
    try:
        with pytest.raises(RequestError, match="exceed the 32 tokens a sequence holds") as e:
            engine.submit(prompts[0], max_tokens=30)
        assert e.value.param == "max_tokens"
        with pytest.raises(RequestError, match="a sequence holds 32") as e:
            engine.submit(list(range(10, 50)))
        assert e.value.param == "prompt"
        for mode, weights, field in (("nonsense", None, "mode"), ("static", [1.0], "weights"),
                                     ("static", [float("nan"), 1.0], "weights"), ("single:nope", None, "mode")):
            with pytest.raises(ModeError) as e:
                engine.submit(prompts[0], mode, weights, max_tokens=2)
            assert e.value.field == field, (mode, weights, str(e.value))
        with pytest.raises(RequestError, match="token ids must be in"):
            engine.submit([10**9])
        assert engine.submit(prompts[1], max_tokens=3, sampling=GREEDY).result(timeout=60).tokens
    finally:
        engine.close()


def test_many_concurrent_clients(setup):
    """Sixteen threads submitting and streaming at once: every answer equals its solo one."""
    llm, prompts = setup["llm"], setup["prompts"]
    jobs = [(prompts[i % len(prompts)], *MODES[i % len(MODES)]) for i in range(16)]
    refs = {(tuple(p), m): solo(llm, p, m, w, 8) for p, m, w in jobs}
    engine = BatchEngine(llm, n_parallel=4, n_ctx=4 * 96)
    out = [None] * len(jobs)

    def client(i):
        p, m, w = jobs[i]
        out[i] = "".join(engine.submit(p, m, w, max_tokens=8, sampling=GREEDY).stream())

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
    finally:
        engine.close()
    for i, (p, m, _) in enumerate(jobs):
        assert out[i] == llm.detokenize(refs[(tuple(p), m)]).decode("utf-8", errors="replace"), (i, m)
    assert np.all([o is not None for o in out])


def test_logprobs_gates_and_grammar_per_request(setup):
    """In one batch: a request with logprobs (and the prompt's), one tracing the gate after
    steps without recording, one under a grammar, one plain; each gets its own, and the plain
    one its solo answer. Logprobs against FlowLlama's logits (logits_all), gates against
    FlowLlama's records."""
    from llama_cpp import llama_grammar

    from loraflow.runtime import FlowLlama

    llm, prompts = setup["llm"], setup["prompts"]
    p_lp, p_tr, p_gr, p_plain = prompts[0], prompts[2], prompts[3], prompts[1]
    ref_lp = solo(llm, p_lp, "dynamic", None, 6)
    ref_plain = solo(llm, p_plain, "average", None, 6)
    ref_tr = solo(llm, p_tr, "dynamic", None, 6)
    engine = BatchEngine(llm, n_parallel=4, n_ctx=4 * 128)
    try:
        warm = engine.submit(p_tr, "dynamic", max_tokens=3, sampling=GREEDY)   # a graph laid out without gates
        warm.result(timeout=60)
        with engine.lock:
            a = engine.submit(p_lp, "dynamic", max_tokens=6, sampling=GREEDY, logprobs=3, prompt_logprobs=True)
            b = engine.submit(p_tr, "dynamic", max_tokens=6, sampling=GREEDY, trace=True)
            c = engine.submit(p_gr, "single:math", max_tokens=24,
                              sampling=Sampling(temperature=0.0, grammar=llama_grammar.JSON_GBNF))
            d = engine.submit(p_plain, "average", max_tokens=6, sampling=GREEDY)
        ra, rb, rc, rd = (r.result(timeout=120) for r in (a, b, c, d))
        with pytest.raises(RequestError) as e:
            engine.submit(p_plain, sampling=Sampling(grammar="root ::= ("))
        assert e.value.param == "grammar"
    finally:
        engine.close()
    assert ra.tokens == ref_lp and rd.tokens == ref_plain and rb.tokens == ref_tr
    # logprobs: the log-softmax of the row that predicted each token (prompt rows too)
    ref = FlowLlama(llm.model_path, flow_path=llm.flow.path, n_ctx=256, n_threads=2, verbose=False, logits_all=True)
    try:
        rows = ref.eval_logits(p_lp + ra.tokens)
    finally:
        ref.close()
    ids = p_lp + ra.tokens
    infos = a.prompt_token_logprobs + a.token_logprobs
    assert infos[0] is None and len(infos) == len(ids)
    for i in range(1, len(ids)):
        lp = rows[i - 1].astype(np.float64) - np.log(np.exp(rows[i - 1].astype(np.float64) - rows[i - 1].max()).sum()) \
            - rows[i - 1].max()
        chosen, top = infos[i]
        assert abs(chosen - lp[ids[i]]) < 1e-4, i
        assert [t for t, _ in top] == list(np.argsort(-lp)[:3]), i
    # gates: FlowLlama's records of the rows that predicted the tokens
    llm.record_gates(True)
    try:
        llm.set_mode("dynamic")
        llm.clear_gate_log()
        llm.eval(p_tr + rb.tokens[:-1])
        want = llm.gate_weights()[len(p_tr) - 1:]
    finally:
        llm.record_gates(False)
        llm.clear_gate_log()
    assert len(b.gates) == len(rb.tokens) and np.allclose(np.array(b.gates), want, atol=1e-5)
    assert a.gates == [] and d.token_logprobs == []   # what a request did not ask for is not kept
    # the grammar: JSON, or a prefix of it when max_tokens ran out
    if rc.finish_reason == "stop":
        import json

        json.loads(rc.text)
    assert rc.text.lstrip()[:1] in ("{", "[", '"', "t", "f", "n", "-") or rc.text.lstrip()[:1].isdigit()
