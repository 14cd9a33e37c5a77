"""The one-token LoRA B product alone, in ggml, in the ways it could be written.

    python -m benchmarks.b_product [--shape llama-3.2-1b] [--k 2] [--rank 16] [--threads 2] [--reps 30]

At decode the flow path's B product is, per adapted module, n_out dot products of R = k r
values (B stored [R, n_out], one Q8_0 block per output row at R = 32). Is that per-row work
worth writing differently? This builds benchmarks/b_product.cpp against the ggml of the
installed (patched) llama-cpp-python and times one token's B products of a whole model of
shape --shape (all 7 projections of every layer, random values), the variants interleaved:

    q8_0, f16, f32   mul_mat(B [R, n_out], g), B of that type
    q8_0_plus_y      y + B g: the runtime's decode path, one node (the patch's fused MUL_MAT + ADD
                     of one column: a vec_dot call per row, rows split among threads)
    q8_0_two_columns g twice (n = 2 goes to ggml's sgemm, tinyBLAS, which n = 1 does not)
    out_prod_q8_0    B stored transposed (R rows of n_out), ggml_out_prod: R multiply-adds of
                     n_out values instead of n_out dots of R
    swapped_f16      mul_mat(g, B): n_out columns, so ggml's sgemm could take it

Reported: the median time per token, the range, each variant's median ratio to q8_0 over the
repetitions, the rate at which it reads B, and each variant's error against the exact product
(all get the same values; a variant that computes something else fails the run).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import statistics
import subprocess
import sys
import sysconfig
from collections import defaultdict
from pathlib import Path

from benchmarks.shapes import SHAPES
from loraflow.models import cache_dir

HERE = Path(__file__).resolve().parent
MAX_ERROR = 0.25           # Q8_0 rounding of B and g reaches ~5% at the worst of 10^5 outputs; a wrong product ~1.4


def bytes_per_value(variant: str) -> float:
    """Bytes per value of B as the variant stores it (its name says the type: q8_0, f16 or f32)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[re.search(r"q8_0|f16|f32", variant).group().upper()]]
    return size / block


def module_outputs(name: str) -> list[int]:
    """n_out of q, k, v, o, gate, up, down in shape `name`."""
    s = SHAPES[name]
    return [s.n_head * s.head_dim, s.n_head_kv * s.head_dim, s.n_head_kv * s.head_dim, s.n_embd,
            s.n_ff, s.n_ff, s.n_embd]


def build() -> Path:
    """benchmarks/b_product.cpp compiled against the installed llama_cpp's ggml (cached by source)."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    include = Path(sysconfig.get_paths()["purelib"]) / "include"
    if not (include / "ggml-cpu.h").is_file():
        raise SystemExit(f"{include}/ggml-cpu.h is missing: install loraflow's llama-cpp-python (make install)")
    src = HERE / "b_product.cpp"
    key = hashlib.sha256(src.read_bytes() + str(lib).encode()).hexdigest()[:16]
    exe = cache_dir("bench", "b_product") / f"b_product-{key}"
    if not exe.exists():
        subprocess.run(["g++", "-O2", "-std=c++17", str(src), f"-I{include}", f"-L{lib}", "-lggml", "-lggml-base",
                        "-lggml-cpu", f"-Wl,-rpath,{lib}", "-o", str(exe)], check=True)
    return exe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="llama-3.2-1b")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    R, outs, n_layer = args.k * args.rank, module_outputs(args.shape), SHAPES[args.shape].n_layer
    proc = subprocess.run([str(build()), str(args.threads), str(args.reps), str(R), str(n_layer), *map(str, outs)],
                          check=True, capture_output=True, text=True)
    ms, error = defaultdict(dict), {}
    for line in proc.stdout.split("\n"):
        if line.startswith("error "):
            _, variant, e = line.split()
            error[variant] = float(e)
        elif line:
            variant, rep, t = line.split()
            ms[variant][int(rep)] = float(t)
    values = n_layer * sum(outs) * R
    print(f"{args.shape}: B products of one token, {n_layer} layers x 7 modules, R = {R} ({args.k} x r {args.rank}), "
          f"{args.threads} threads, {args.reps} repetitions interleaved\n")
    print("| variant | ms per token (median) | range | / q8_0 (median of same-rep ratios) | B read GB/s | error |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant, times in ms.items():
        t = list(times.values())
        ratio = statistics.median(times[r] / ms["q8_0"][r] for r in times)
        rate = values * bytes_per_value(variant) / (statistics.median(t) / 1e3) / 1e9
        print(f"| {variant} | {statistics.median(t):.2f} | {min(t):.2f}-{max(t):.2f} | {ratio:.2f}x | {rate:.1f} | {error[variant]:.1e} |")
    print("\nerror: the largest difference from the exact B g over the RMS of B g (Q8_0 and F16 rounding)")
    wrong = [v for v, e in error.items() if not e < MAX_ERROR]
    if wrong:
        print(f"{', '.join(wrong)}: not the same product (error above {MAX_ERROR}); the timings compare unlike work")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
