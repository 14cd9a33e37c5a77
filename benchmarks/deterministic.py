"""What `--deterministic` (batch-invariant CPU kernels) costs: prompt and decode throughput of the
batch engine with the default kernels and with the deterministic ones, in one process, on one
model, the two interleaved round by round.

    python -m benchmarks.deterministic [--model default|PATH|shape:NAME] [--flow PATH|none]
                                       [--parallel 8] [--prompt-tokens 128] [--decode-tokens 32]
                                       [--threads 2] [--repeats 5]

Default: SmolLM2-135M-Instruct Q4_1 with the committed compose flow file (dynamic mode); `shape:
llama-3.2-1b` is benchmarks/shapes.py's random-weight Q4_K_M model (base only), where the
deterministic kernels give up the repacked-weight gemm. Per round and kernels: `prefill`, every
slot's prompt in one batch (max_tokens 1), and `decode`, every slot generating --decode-tokens
after a short prompt; and `solo decode`, one sequence. Reported: tokens/s (median of the rounds)
and deterministic/default ratios (median, min-max of the rounds' ratios). The machine is shared
and noisy: the kernels alternate within each round, in an order that flips round to round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--flow", default=str(REPO / "loraflow" / "adapters" / "compose-es-math.flow.gguf"))
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from loraflow.runtime.batch_engine import BatchEngine
    from loraflow.runtime.flow_llama import FlowLlama
    from loraflow.runtime.sampling import Sampling

    if args.model == "default":
        from loraflow.models import default_model_path

        model = default_model_path()
    elif args.model.startswith("shape:"):
        from benchmarks.shapes import shape_path

        model, args.flow = shape_path(args.model[len("shape:"):]), "none"
    else:
        model = Path(args.model)
    flow = None if args.flow == "none" else args.flow
    n_ctx = args.prompt_tokens + args.decode_tokens + 16
    llm = FlowLlama(str(model), flow_path=flow, n_ctx=n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                    verbose=False)
    engines = {k: BatchEngine(llm, n_parallel=args.parallel, n_ctx=args.parallel * n_ctx, deterministic=(k == "det"))
               for k in ("default", "det")}
    n_vocab = llm.n_vocab()
    greedy = Sampling(temperature=0.0)

    def prompt(i, n):
        return [1 + (7919 * (i * 1000 + j)) % (n_vocab - 1) for j in range(n)]

    def timed(engine, prompts, max_tokens):
        for s in engine.slots:            # no prefix reuse between rounds
            s.tokens, s.mode_key = [], None
        t = time.perf_counter()
        reqs = [engine.submit(p, "dynamic" if flow else "off", max_tokens=max_tokens, sampling=greedy)
                for p in prompts]
        done = [r.result(3600) for r in reqs]
        n = sum(len(c.tokens) if max_tokens > 1 else c.n_prompt for c in done)
        return n / (time.perf_counter() - t)

    work = {
        "prefill": lambda e, r: timed(e, [prompt(r * 100 + i, args.prompt_tokens) for i in range(args.parallel)], 1),
        "decode": lambda e, r: timed(e, [prompt(r * 100 + i, 8) for i in range(args.parallel)], args.decode_tokens),
        "solo decode": lambda e, r: timed(e, [prompt(r * 100, 8)], args.decode_tokens),
    }
    speeds = {(w, k): [] for w in work for k in engines}
    for r in range(args.repeats):
        for w, fn in work.items():
            for k in (("default", "det") if r % 2 == 0 else ("det", "default")):
                speeds[w, k].append(fn(engines[k], r))
        print(f"round {r + 1}: " + ", ".join(f"{w} {k} {speeds[w, k][-1]:.1f}" for w in work for k in engines),
              flush=True)
    for e in engines.values():
        e.close()
    llm.close()
    print(f"\n{model.name}{' + ' + Path(flow).name if flow else ''}, {args.parallel} slots, {args.threads} threads, "
          f"{args.repeats} rounds\n")
    print("| work | default tok/s | deterministic tok/s | deterministic / default (min-max) |\n|---|---:|---:|---:|")
    for w in work:
        a, b = speeds[w, "default"], speeds[w, "det"]
        ratios = [y / x for x, y in zip(a, b)]
        print(f"| {w} | {statistics.median(a):.1f} | {statistics.median(b):.1f} | "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
