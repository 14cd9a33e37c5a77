"""Memory and time of a gate-training step over a GGUF base: dequantized whole by transformers
(today's `train-gate --dequantize`, fp32 or bf16) against kept in its quantized blocks (the
default, gate_training/quantized.py).

    python -m benchmarks.train_memory [--shape llama-3.2-1b] [--paths quantized,fp32,bf16]
                                      [--steps 3] [--batch 1] [--tokens 256] [--threads 1]

The base is the random-weight Q4_K_M GGUF of the shape (benchmarks/shapes.py: Q4_K matrices,
Q6_K for the output or tied embedding and some attn_v/ffn_down, as llama.cpp's quantizer makes
them), two random rank-16 LoRAs on all 7 projections, and examples of --tokens tokens (half
prompt, half response). Each path runs in a process of its own, which loads the FlowModel as
train-gate does (load_flow_model), sets the gates' input scales, then runs --steps training
steps (response_loss, backward, AdamW) on batches of --batch examples. Reported per path: the
load seconds, the first step and the median of the later steps, and the process's peak RSS
(getrusage of the child), beside the GGUF's size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PATHS = ("quantized", "fp32", "bf16")


def child(args) -> dict:
    """One path, in this process: load, then time the steps; returns the numbers."""
    import torch

    from loraflow.gate_training.load import load_flow_model
    from loraflow.gate_training.train import response_loss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    quantized = args.child == "quantized"
    dtype = "bf16" if args.child == "bf16" else "fp32"
    t0 = time.time()
    flow = load_flow_model(args.base, json.loads(args.adapters), dtype=dtype, quantized=quantized)
    load_s = time.time() - t0
    n_vocab = flow.model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, n_vocab, (args.batch, args.tokens), generator=gen)
    labels = ids.clone()
    labels[:, : args.tokens // 2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    flow.set_input_scales(flow.measure_input_scales([batch]))
    if args.grad_checkpointing:
        from loraflow.gate_training.train import enable_checkpointing

        enable_checkpointing(flow.model)
        flow.model.train()
    params = list(flow.gates.parameters())
    opt = torch.optim.AdamW(params, lr=2e-2)
    steps = []
    for _ in range(args.steps):
        t = time.time()
        loss, n = response_loss(flow.model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(time.time() - t)
    return {"path": args.child, "load_s": round(load_s, 1), "first_step_s": round(steps[0], 2),
            "step_s": round(statistics.median(steps[1:] or steps), 2), "loss": round(loss.item() / n, 4)}


def run_path(path: str, base: Path, adapters: list, args) -> dict:
    """`path` in a child process; its numbers and peak RSS (os.wait4's rusage: that child's alone)."""
    cmd = [sys.executable, "-m", "benchmarks.train_memory", "--child", path, "--base", str(base),
           "--adapters", json.dumps(adapters), "--steps", str(args.steps), "--batch", str(args.batch),
           "--tokens", str(args.tokens), "--threads", str(args.threads)]
    if args.grad_checkpointing:
        cmd.append("--grad-checkpointing")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    rss = usage.ru_maxrss / 2**20            # KiB -> GiB
    if status != 0:
        return {"path": path, "error": f"exit status {status >> 8}, signal {status & 0x7f}",
                "peak_rss_gib": round(rss, 2)}
    return json.loads(out.strip().splitlines()[-1]) | {"peak_rss_gib": round(rss, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {', '.join(PATHS)}")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--work", default=None, help="folder for the LoRAs  [default: the benchmark cache]")
    ap.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--adapters", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    from benchmarks.shapes import shape_path
    from loraflow import synthetic
    from loraflow.models import cache_dir

    base = shape_path(args.shape)
    work = Path(args.work) if args.work else cache_dir("bench", "train-memory", args.shape)
    _, _, shapes = synthetic.base_gguf_shapes(base)
    adapters = [(name, str(synthetic.write_random_peft_adapter(work / name, shapes, r=16, alpha=32, seed=i + 1)))
                for i, name in enumerate(("lang", "math"))]
    print(f"{args.shape}: {base} ({base.stat().st_size / 2**30:.2f} GiB), batch {args.batch} x {args.tokens} "
          f"tokens, {args.threads} thread(s){', gradient checkpointing' if args.grad_checkpointing else ''}",
          flush=True)
    rows = []
    for path in args.paths.split(","):
        row = run_path(path, base, adapters, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    size = base.stat().st_size / 2**30
    print(f"\n| path | load s | first step s | step s | peak RSS GiB | RSS / file |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['path']} | {r['error']} | | | {r['peak_rss_gib']} | |")
        else:
            print(f"| {r['path']} | {r['load_s']} | {r['first_step_s']} | {r['step_s']} | {r['peak_rss_gib']} | "
                  f"{r['peak_rss_gib'] / size:.1f}x |")


if __name__ == "__main__":
    main()
