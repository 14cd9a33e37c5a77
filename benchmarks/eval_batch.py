"""`loraflow eval --backend runtime --batch-size N`: how much faster batched evaluation is than
one problem at a time, and how many answers it changes, in one run.

    python -m benchmarks.eval_batch [--batch-sizes 1,4,8,16] [--problems 96] [--modes dynamic,static]
                                    [--kernels fast,deterministic] [--threads 2] [--repeats 3]
                                    [--out benchmarks/results]

The model is SmolLM2-135M-Instruct Q4_1 with the committed compose flow adapter; the problems are
the first --problems of the compose recipe's test set (recipes/compose/data.py, seed 0: a Spanish
math word problem each), answered greedily in up to 40 tokens, as `make compose` evaluates them.
Batch size 1 is the sequential path (one llama_context, one problem after another); larger ones
decode that many problems together on the batch engine (runtime/batch_engine.py), every slot in
the evaluation's mode; every evaluation is a `loraflow eval` process of its own. Reported per mode and batch size: problems per second (median over the
repeats), the speedup against batch size 1 (median and min-max of the same round's ratios), the
exact answers, and the answers whose text differs from batch size 1's (a batch changes the order
of some sums, which can flip near-tie tokens). The machine is shared and noisy: each round runs
every batch size once, in an order that rotates from round to round. --kernels: the default
kernels (fast) and `--deterministic` (batch-invariant ones), each against its own batch size 1
for the answers and against the fast batch size 1 of the same round for the speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from recipes.compose.data import EXTRACT, MAX_TOKENS  # as make compose evaluates

REPO = Path(__file__).resolve().parent.parent

STATIC_WEIGHTS = "-0.194,1.409"       # compose's learned task-level static weights (docs/RESULTS.md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument("--problems", type=int, default=96)
    ap.add_argument("--modes", default="dynamic,static")
    ap.add_argument("--kernels", default="fast,deterministic")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    if 1 not in sizes:
        sizes.insert(0, 1)                # the baseline
    modes = args.modes.split(",")
    kernels = args.kernels.split(",")

    from recipes.compose import data as compose_data

    flow = REPO / "loraflow" / "adapters" / "compose-es-math.flow.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        compose_data.write_sets(Path(tmp), 0)
        rows = (Path(tmp) / "test.jsonl").read_text(encoding="utf-8").splitlines()[:args.problems]
        data = Path(tmp) / "problems.jsonl"
        data.write_text("\n".join(rows) + "\n", encoding="utf-8")
        runs = {(kn, m, b): [] for kn in kernels for m in modes for b in sizes}
        for r in range(args.repeats):
            for mode in modes:
                order = [(kn, b) for b in sizes for kn in kernels]
                order = order[r % len(order):] + order[:r % len(order)]
                for kn, b in order:
                    # each evaluation in its own process, as `loraflow eval` runs: in one process, a
                    # batch after a one-at-a-time run was measured 3x slower (the first run's OpenMP
                    # threads spin next to the engine thread's)
                    out = Path(tmp) / f"{kn}-{mode}-{b}-{r}.json"
                    subprocess.run([str(Path(sys.executable).parent / "loraflow"), "eval", "--backend", "runtime",
                                    "--mode", mode, "--data", str(data), "--extract", EXTRACT,
                                    "--max-tokens", str(MAX_TOKENS), "-f", str(flow), "--threads", str(args.threads),
                                    "--batch-size", str(b), "--show", "0", "-q", "-o", str(out),
                                    *(["--deterministic"] if kn == "deterministic" else []),
                                    *(["--weights", STATIC_WEIGHTS] if mode == "static" else [])],
                                   check=True, stdout=subprocess.DEVNULL)
                    rep = json.loads(out.read_text())
                    runs[kn, mode, b].append(rep)
                    print(f"round {r + 1} {kn} {mode} batch {b}: {rep['seconds']:.1f} s, {rep['correct']} right",
                          flush=True)

    table = ["| kernels | mode | batch size | problems/s | speedup vs fast batch 1 (min-max) | exact answers | "
             "answers differing from the same kernels' batch 1 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    record = {"problems": args.problems, "threads": args.threads, "repeats": args.repeats, "results": []}
    for kn in kernels:
        for mode in modes:
            base, own = runs[kernels[0], mode, 1], runs[kn, mode, 1]
            for b in sizes:
                reps = runs[kn, mode, b]
                ratios = [one["seconds"] / rep["seconds"] for one, rep in zip(base, reps)]
                differ = max(sum(x["prediction"] != y["prediction"] for x, y in zip(own[0]["results"], rep["results"]))
                             for rep in reps)
                speed = statistics.median(args.problems / rep["seconds"] for rep in reps)
                table.append(f"| {kn} | {mode} | {b} | {speed:.2f} | {statistics.median(ratios):.2f}x "
                             f"({min(ratios):.2f}-{max(ratios):.2f}) | {reps[0]['correct']} of {args.problems} | {differ} |")
                record["results"].append({"kernels": kn, "mode": mode, "batch_size": b,
                                          "seconds": [rep["seconds"] for rep in reps], "speedup": ratios,
                                          "correct": [rep["correct"] for rep in reps], "differing_from_batch_1": differ})
    print("\n".join(table))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval_batch.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "eval_batch.md").write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
