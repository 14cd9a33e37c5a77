"""The flow adapter in llama.cpp's batching and cache machinery: several sequences in one
batch, KV-cache reuse across calls, and shifting the cache (context shift).

Gates are per token, so a batch holding different prompts must give each prompt exactly what
it gets alone. FlowLlama's own context holds one sequence (llama-cpp-python's Llama makes it
with n_seq_max = 1), so the batches run on a second context of the same model with the same
flow adapter set, through llama.cpp's low-level API; the prompts alone run on FlowLlama.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from parity_setup import GPU_LAYERS, MultiSeqContext, batch_tolerance, gate_tolerance  # noqa: E402
from tiny_flow import build_tiny_flow  # noqa: E402

PROMPTS = [b"The quick brown fox jumps over the lazy dog", b"One two three four five", b"Why is the sky blue?"]


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    from loraflow.runtime import FlowLlama

    tm = tiny_models.get("llama")
    flow = build_tiny_flow(tm, tmp_path_factory.mktemp("batch"))
    llm = FlowLlama(str(tm.gguf), flow_path=str(flow), n_ctx=512, n_threads=1, verbose=False, logits_all=True,
                    n_gpu_layers=GPU_LAYERS,
                    record_gates=True)
    prompts = [llm.tokenize(p, add_bos=False) for p in PROMPTS]
    tol = batch_tolerance(llm, prompts)
    yield dict(llm=llm, base=str(tm.gguf), flow=str(flow), prompts=prompts, n_layer=tm.n_layer, tol=tol)
    llm.close()


def alone(llm, tokens):
    """Logits [n, n_vocab] and gate weights [n, n_layer, k] of `tokens` evaluated by themselves."""
    llm.clear_gate_log()
    logits = llm.eval_logits(tokens)
    gates = llm.gate_weights()
    llm.clear_gate_log()
    return logits, gates


@pytest.mark.parametrize("kv_unified", [False, True], ids=["kv-per-seq", "kv-unified"])
@pytest.mark.parametrize("mode, weights", [("dynamic", None), ("static", "per-layer")])
@pytest.mark.parametrize("n_seq", [2, 3])
def test_prompts_in_one_batch_equal_each_alone(setup, n_seq, mode, weights, kv_unified):
    llm = setup["llm"]
    if weights == "per-layer":
        weights = np.linspace(-0.3, 1.2, setup["n_layer"] * 2).reshape(-1, 2).tolist()
    llm.set_mode(mode, weights)
    prompts = setup["prompts"][:n_seq]
    refs = [alone(llm, p) for p in prompts]
    multi = MultiSeqContext(llm, n_seq, kv_unified)
    try:
        logits, gates = multi.decode(prompts)
    finally:
        multi.close()
        llm.set_mode("dynamic")
    for i, ((ref_logits, _), got) in enumerate(zip(refs, logits)):
        assert got.shape == ref_logits.shape
        assert rel_err(got, ref_logits) < setup["tol"], f"sequence {i}: {rel_err(got, ref_logits):.2e}"
    if mode == "dynamic":
        # the same per-token weights, whichever way llama.cpp split the batch into ubatches
        ref_gates = np.concatenate([g for _, g in refs])
        assert gates is not None and gates.shape == ref_gates.shape
        for row in gates:
            assert np.abs(ref_gates - row).max(axis=(1, 2)).min() < gate_tolerance(setup["tol"])


def test_flow_matters_in_batches(setup):
    """The equality above is not trivial: the adapter changes the logits of a batched prompt."""
    llm = setup["llm"]
    llm.set_mode("dynamic")
    multi = MultiSeqContext(llm, 2, False)
    try:
        with_flow, _ = multi.decode(setup["prompts"][:2])
    finally:
        multi.close()
    llm.set_mode("off")
    try:
        base, _ = alone(llm, setup["prompts"][0])
    finally:
        llm.set_mode("dynamic")
    assert rel_err(with_flow[0], base) > 1e-2


@pytest.mark.parametrize("kv_unified", [
    # with one KV stream per sequence llama.cpp splits a mixed batch into ubatches by sequence;
    # the recorded rows must still come back in batch order
    pytest.param(False, id="kv-per-seq"),
    pytest.param(True, id="kv-unified"),
])
def test_recorded_gates_follow_batch_order(setup, kv_unified):
    llm = setup["llm"]
    llm.set_mode("dynamic")
    prompts = setup["prompts"][:2]
    ref = np.concatenate([alone(llm, p)[1] for p in prompts])
    multi = MultiSeqContext(llm, 2, kv_unified)
    try:
        _, gates = multi.decode(prompts)
    finally:
        multi.close()
    np.testing.assert_allclose(gates, ref, rtol=0, atol=gate_tolerance(setup["tol"]))


def test_kv_cache_reuse_across_calls(setup):
    """A second completion sharing the first one's prompt as a prefix reuses the cache (only
    the new tokens are evaluated) and gives what a fresh model gives."""
    from loraflow.runtime import FlowLlama

    llm = setup["llm"]
    llm.set_mode("dynamic")
    p1 = "The quick brown fox jumps over the lazy dog"
    p2 = p1 + " and then it runs into the forest"
    n1, n2 = len(llm.tokenize(p1.encode())), len(llm.tokenize(p2.encode()))

    llm.clear_kv()
    llm.create_completion(p1, max_tokens=6, temperature=0.0)
    llm.clear_gate_log()
    reused = llm.create_completion(p2, max_tokens=6, temperature=0.0)
    evaluated = llm.gate_weights().shape[0]
    scores_reused = np.array(llm.scores[:n2], dtype=np.float32)
    assert evaluated < n2, f"the shared prefix was evaluated again ({evaluated} tokens for a {n2}-token prompt)"
    assert evaluated >= n2 - n1

    fresh_llm = FlowLlama(setup["base"], flow_path=setup["flow"], n_ctx=512, n_threads=1, verbose=False,
                          n_gpu_layers=GPU_LAYERS,
                          logits_all=True)
    try:
        fresh = fresh_llm.create_completion(p2, max_tokens=6, temperature=0.0)
        scores_fresh = np.array(fresh_llm.scores[:n2], dtype=np.float32)
    finally:
        fresh_llm.close()
    assert reused["choices"][0]["text"] == fresh["choices"][0]["text"]
    assert rel_err(scores_reused, scores_fresh) < setup["tol"]


def test_mode_switch_does_not_reuse_stale_cache(setup):
    llm = setup["llm"]
    p = "The quick brown fox"
    llm.set_mode("dynamic")
    llm.create_completion(p, max_tokens=4, temperature=0.0)
    llm.set_mode("single:math")
    after = np.array(llm.eval_logits(llm.tokenize(p.encode())), dtype=np.float32)
    llm.set_mode("dynamic")
    llm.create_completion(p, max_tokens=4, temperature=0.0)
    llm.set_mode("single:math")
    llm.create_completion(p, max_tokens=1, temperature=0.0)  # a cached prompt, mode changed in between
    got = np.array(llm.scores[: len(after)], dtype=np.float32)
    llm.set_mode("dynamic")
    assert rel_err(got, after) < setup["tol"]


@pytest.mark.parametrize("mode", ["dynamic", "off"])
def test_context_shift(setup, mode):
    """Shifting the cached positions (what a context shift does to the kept tokens) with the flow
    adapter set: continuing after a shift by D matches evaluating at positions D.. directly,
    as closely as it does for the base model alone."""
    import llama_cpp

    from loraflow.runtime.llama_api import Batch, Context

    llm = setup["llm"]
    llm.set_mode(mode)
    toks, nxt = setup["prompts"][0], llm.tokenize(b" again and again", add_bos=False)
    D, n_vocab = 37, llm.n_vocab()
    ctx, batch = Context.borrow(llm.ctx), Batch(64)

    def last_logits():
        return ctx.logits(len(nxt) - 1, n_vocab).copy()

    try:
        llm.clear_kv()
        assert ctx.decode(batch.set_tokens(toks, 0)) == 0
        llama_cpp.llama_memory_seq_add(ctx.memory(), 0, 0, -1, D)
        assert ctx.decode(batch.set_tokens(nxt, len(toks) + D)) == 0
        shifted = last_logits()

        ctx.clear_kv()
        assert ctx.decode(batch.set_tokens(toks, D)) == 0
        assert ctx.decode(batch.set_tokens(nxt, len(toks) + D)) == 0
        direct = last_logits()
    finally:
        batch.close()
        llm.clear_kv()
        llm.set_mode("dynamic")
    assert np.all(np.isfinite(shifted))
    assert rel_err(shifted, direct) < 1e-3  # RoPE applied in two steps vs one: float rounding only
