"""Long runs: 4,000 generated tokens through many context shifts with the flow adapter set
(dynamic mode), the process's memory flat after warm-up and every logit finite; and two
FlowLlama instances with different flow files in one process, used in turns, each giving exactly
what it gives alone.

llama-cpp-python does not shift the context itself (it stops at n_ctx), so `generate_with_shift`
does what llama.cpp's own generation loop does when the cache is full: keep the first N_KEEP
tokens, drop half of the rest, and slide the remainder down (`kv_cache_seq_rm` and
`kv_cache_seq_shift`, the calls tests/test_batch_cache.py checks for exactness).

The tiny llama model runs in the normal suite (seconds); the same soak on the default model
(SmolLM2-135M-Instruct Q4_1, a random flow file made for it) is marked slow.
"""

from __future__ import annotations

import numpy as np
import pytest

from tiny_flow import build_tiny_flow

N_CTX = 512
N_KEEP = 16
N_TOKENS = 4000
WARMUP = 1000          # tokens before the memory baseline is taken
RSS_GROWTH_MAX = 8 << 20  # bytes the resident set may grow between the baseline and the end


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def generate_with_shift(llm, prompt: list[int], n_tokens: int, seed: int = 0):
    """Sample n_tokens after `prompt` one at a time on llm's context, shifting it when full.
    Returns (tokens, number of shifts, [(tokens so far, RSS)], whether every logit was finite)."""
    import llama_cpp

    from loraflow.runtime.llama_api import Batch, Context

    ctx, n_vocab = Context.borrow(llm.ctx), llm.n_vocab()
    rng = np.random.default_rng(seed)
    batch = Batch(len(prompt))
    out, rss, shifts, finite = [], [], 0, True
    try:
        llm.clear_kv()
        assert ctx.decode(batch.set_tokens(prompt, 0)) == 0
        n_past = len(prompt)
        last = len(prompt) - 1
        for i in range(n_tokens):
            logits = ctx.logits(last, n_vocab)
            finite &= bool(np.isfinite(logits).all())
            p = np.exp((logits - logits.max()) / 0.8)
            token = int(rng.choice(n_vocab, p=p / p.sum()))
            out.append(token)
            if n_past >= N_CTX:  # full: keep N_KEEP, drop half of the rest, slide the remainder down
                n_discard = (n_past - N_KEEP) // 2
                llama_cpp.llama_memory_seq_rm(ctx.memory(), 0, N_KEEP, N_KEEP + n_discard)
                llama_cpp.llama_memory_seq_add(ctx.memory(), 0, N_KEEP + n_discard, n_past, -n_discard)
                n_past -= n_discard
                shifts += 1
            assert ctx.decode(batch.set_tokens([token], n_past)) == 0
            n_past += 1
            last = 0
            if (i + 1) % 250 == 0:
                rss.append((i + 1, rss_bytes()))
    finally:
        batch.close()
        llm.clear_kv()
    return out, shifts, rss, finite


def soak(llm, prompt):
    tokens, shifts, rss, finite = generate_with_shift(llm, prompt, N_TOKENS)
    base = dict(rss)[WARMUP]
    growth = rss[-1][1] - base
    print(f"\nsoak: {len(tokens)} tokens, {shifts} context shifts, {len(set(tokens))} distinct tokens; RSS after "
          f"{WARMUP} tokens {base / 2**20:.1f} MiB, at the end {rss[-1][1] / 2**20:.1f} MiB "
          f"(growth {growth / 2**20:+.2f} MiB, max {max(r for _, r in rss) / 2**20:.1f} MiB)")
    assert len(tokens) == N_TOKENS
    assert finite, "a logit was NaN or infinite"
    assert shifts >= (N_TOKENS - N_CTX) // (N_CTX // 2)  # shifted many times
    assert growth < RSS_GROWTH_MAX, f"RSS grew by {growth / 2**20:.1f} MiB after warm-up: {rss}"
    assert all(r - base < RSS_GROWTH_MAX for n, r in rss if n >= WARMUP)


@pytest.fixture(scope="module")
def tiny(tiny_models, tmp_path_factory):
    tm = tiny_models.get("llama")
    work = tmp_path_factory.mktemp("soak")
    flows = [build_tiny_flow(tm, work / "one"), build_tiny_flow(tm, work / "two", names=["code", "chat"], strength=1.0)]
    return tm, flows


def test_soak_tiny_model(tiny):
    from loraflow.runtime import FlowLlama

    tm, flows = tiny
    llm = FlowLlama(str(tm.gguf), flow_path=str(flows[0]), mode="dynamic", n_ctx=N_CTX, n_threads=1, verbose=False)
    try:
        soak(llm, llm.tokenize(b"Once upon a time, in a land far away,"))
    finally:
        llm.close()


@pytest.mark.slow
def test_soak_default_model(tmp_path):
    from loraflow import synthetic
    from loraflow.converter.flow import convert_flow
    from loraflow.models import default_model_path
    from loraflow.runtime import FlowLlama

    base = default_model_path()
    n_layer, n_embd, shapes = synthetic.base_gguf_shapes(base)
    names = ["alpha", "beta"]
    loras = [(n, str(synthetic.write_random_peft_adapter(tmp_path / n, shapes, r=8, alpha=16, seed=21 + i)))
             for i, n in enumerate(names)]
    gate = synthetic.write_gate_checkpoint(tmp_path / "gate.safetensors",
                                           synthetic.random_gate(n_layer, 2, n_embd, seed=7), names)
    flow = convert_flow(base, loras, gate, tmp_path / "flow.gguf", outtype="f16")
    llm = FlowLlama(str(base), flow_path=str(flow), mode="dynamic", n_ctx=N_CTX, n_threads=1, verbose=False)
    try:
        soak(llm, llm.tokenize(b"Once upon a time, in a land far away,"))
    finally:
        llm.close()


def test_two_instances_stay_independent(tiny):
    """Two FlowLlama with different flow files (and then different modes), called in turns:
    each one's logits equal its own run alone, to the last bit of float32 rounding."""
    from loraflow.runtime import FlowLlama

    tm, flows = tiny
    kw = dict(n_ctx=256, n_threads=1, verbose=False, logits_all=True)
    prompts = [b"The quick brown fox jumps over the lazy dog", b"One two three four five six"]

    def solo(flow, mode):
        llm = FlowLlama(str(tm.gguf), flow_path=str(flow), mode=mode, **kw)
        try:
            return [llm.eval_logits(llm.tokenize(p)) for p in prompts], llm.create_completion(
                prompts[0].decode(), max_tokens=12, temperature=0.0)["choices"][0]["text"]
        finally:
            llm.close()

    alone = {(i, m): solo(f, m) for i, f in enumerate(flows) for m in ("dynamic", "average")}
    assert np.abs(alone[0, "dynamic"][0][0] - alone[1, "dynamic"][0][0]).max() > 1e-2  # the flows differ

    a = FlowLlama(str(tm.gguf), flow_path=str(flows[0]), **kw)
    b = FlowLlama(str(tm.gguf), flow_path=str(flows[1]), **kw)
    try:
        for mode_a, mode_b in (("dynamic", "dynamic"), ("dynamic", "average"), ("average", "dynamic")):
            a.set_mode(mode_a)
            b.set_mode(mode_b)
            for j, p in enumerate(prompts):  # in turns: a, b, a, b
                got_a = a.eval_logits(a.tokenize(p))
                got_b = b.eval_logits(b.tokenize(p))
                np.testing.assert_allclose(got_a, alone[0, mode_a][0][j], rtol=0, atol=1e-5)
                np.testing.assert_allclose(got_b, alone[1, mode_b][0][j], rtol=0, atol=1e-5)
            # token by token generation, interleaved through the two streams
            stream_a = a.create_completion(prompts[0].decode(), max_tokens=12, temperature=0.0, stream=True)
            stream_b = b.create_completion(prompts[0].decode(), max_tokens=12, temperature=0.0, stream=True)
            text_a, text_b = [], []
            for ca, cb in zip(stream_a, stream_b):
                text_a.append(ca["choices"][0]["text"])
                text_b.append(cb["choices"][0]["text"])
            text_a += [c["choices"][0]["text"] for c in stream_a]
            text_b += [c["choices"][0]["text"] for c in stream_b]
            assert "".join(text_a) == alone[0, mode_a][1]
            assert "".join(text_b) == alone[1, mode_b][1]
    finally:
        a.close()
        b.close()
