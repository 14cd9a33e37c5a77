"""Where decode or prefill time goes: Linux `perf` over each configuration.

    python -m benchmarks.profile [--configs base,stock_static,stock_static_patched,flow_dynamic] [--tokens 512]
    python -m benchmarks.profile --phase prefill --shape llama-3.2-1b --outtype q8_0

Each configuration decodes --tokens tokens (after a 64-token prompt), or with --phase prefill
evaluates one --tokens-token prompt, TIMINGS timed runs and a warm-up as in benchmarks.decode,
in its own process under `perf record`; the samples are grouped by the kernel they fall in
and turned into CPU microseconds per token, with the difference to the first configuration.
Needs `perf` (Linux).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import decode
from loraflow.models import default_model_path

FREQ = 4000  # samples per CPU-second
TIMINGS = 3  # timed decode runs per configuration, after one warm-up (decode.median_seconds)
# symbol -> what it is; the first match wins, everything else is "other"
GROUPS = (
    ("ggml_vec_dot_q4_1_q8_1", "base weights (Q4_1 dot)"),
    ("ggml_vec_dot_q4_K", "base weights (Q4_K dot)"),
    ("ggml_vec_dot_q6_K", "base weights (Q6_K dot)"),
    ("ggml_vec_dot_q8_0_q8_0", "Q8_0 dot (LoRA, output/embedding)"),
    ("quantize_row_q8", "activation quantization"),
    ("ggml_vec_dot_f16", "F16 dot (LoRA, attention)"),
    ("tinyBLAS", "tinyBLAS sgemm (F16/F32/Q8_0 tiles)"),
    ("flash_attn", "attention"),
    ("ggml_compute_forward_mul", "elementwise mul/add/cont"),
    ("ggml_compute_forward_add", "elementwise mul/add/cont"),
    ("ggml_compute_forward_dup", "elementwise mul/add/cont"),
    ("ggml_vec_dot_f32", "F32 dot"),
    ("fp32_to_fp16", "F32->F16 of matmul inputs"),
    ("ggml_compute_forward_mul_mat", "matmul bookkeeping"),
    ("libgomp", "thread barriers (OpenMP)"),
)


def group_of(dso: str, sym: str) -> str:
    for key, name in GROUPS:
        if key in sym or key in dso:
            return name
    return "other"


def profile(config: str, tokens: int, inputs: dict, threads: int, work: Path, base: Path,
            phase: str) -> dict[str, float]:
    """CPU microseconds per token (decoded, or of the prompt), by group."""
    data = work / f"{config}.data"
    cmd = [sys.executable, "-m", "benchmarks.profile", "--one", config, "--inputs", json.dumps(inputs),
           "--threads", str(threads), "--tokens", str(tokens), "--base", str(base), "--phase", phase]
    subprocess.run(["perf", "record", "-q", "-F", str(FREQ), "-o", str(data), "--", *cmd], check=True,
                   cwd=decode.REPO, capture_output=True, env=decode.config_env(config))
    report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym",
                             "--field-separator", "\t", "-F", "sample,dso,sym", "--stdio"],
                            check=True, capture_output=True, text=True).stdout
    decoded = (TIMINGS + 1) * tokens  # decode: the prompt's samples are a small share
    out: dict[str, float] = {}
    for line in report.splitlines():
        parts = line.strip().split("\t")
        if line.startswith("#") or len(parts) < 3 or not parts[0].strip().isdigit():
            continue
        name = group_of(parts[1], parts[2])
        out[name] = out.get(name, 0.0) + int(parts[0]) / FREQ / decoded * 1e6
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="base,stock_static,stock_static_patched,flow_dynamic")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--outtype", default="f16", choices=["f32", "f16", "q8_0"])
    ap.add_argument("--phase", default="decode", choices=["decode", "prefill"])
    ap.add_argument("--shape", default=None, help="a real model's shape with random weights (benchmarks/shapes.py)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:  # inside perf: only the phase profiled
        if args.phase == "decode":
            decode.PREFILL, decode.DECODE_TOKENS = (), args.tokens
        else:
            decode.PREFILL, decode.DECODE_TOKENS, decode.DECODE_PROMPT = (args.tokens,), 0, 0
        print(json.dumps(decode.run_one(args.one, args.base, json.loads(args.inputs), args.threads, TIMINGS)))
        return 0

    if args.shape:
        from benchmarks.shapes import shape_path

        base = shape_path(args.shape)
    else:
        base = default_model_path()

    if not shutil.which("perf"):
        raise SystemExit("benchmarks.profile needs Linux `perf` on PATH")
    configs = args.configs.split(",")
    inputs = decode.prepare(base, args.k, args.rank, args.outtype)
    with tempfile.TemporaryDirectory() as tmp:
        prof = {c: profile(c, args.tokens, inputs, args.threads, Path(tmp), base, args.phase) for c in configs}
    names = list(dict.fromkeys(n for _, n in GROUPS)) + ["other"]
    ref = configs[0]
    what = "decoded token" if args.phase == "decode" else f"token of a {args.tokens}-token prompt"
    print(f"CPU microseconds per {what} (all {args.threads} threads), {base.name}, k={args.k}, "
          f"rank {args.rank}, {args.outtype}\n")
    print("| kernel | " + " | ".join(configs) + " | " + " | ".join(f"{c} - {ref}" for c in configs[1:]) + " |")
    print("|---" * (2 * len(configs)) + "|")
    for name in names + ["total"]:
        row = [sum(p.values()) if name == "total" else p.get(name, 0.0) for p in prof.values()]
        print(f"| {name} | " + " | ".join(f"{v:.0f}" for v in row) + " | " +
              " | ".join(f"{v - row[0]:+.0f}" for v in row[1:]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
