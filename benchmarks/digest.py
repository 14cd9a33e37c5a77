"""What checking a flow file's digest costs at load, at a real model's shape.

    python -m benchmarks.digest [--shape llama-3.1-8b] [--k 2] [--rank 16] [--outtype q8_0] [--reps 5]

Makes the flow file `loraflow-convert flow` writes for k random rank-r LoRAs on all 7
projections of the shape (benchmarks/shapes.py) and a random gate, through convert_flow itself;
the base is a header-only GGUF of the shape (its tensor data a hole in a sparse file: the
converter reads only the header). Then, with the file in the page cache (one untimed read
first), times --reps rounds, interleaved, of reading the file once (16 MiB reads into one
buffer) and of loraflow.digest.check_digest (the check FlowAdapter runs after the C++ loader:
the header read, then SHA-256 over the metadata and the tensor data through a memory map).
Prints the medians and ranges; the files stay in the cache for the next run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from pathlib import Path

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHUNK = 16 << 20


def header_only_base(name: str, out: Path) -> Path:
    """A GGUF of shape `name` with the metadata and tensor infos of benchmarks.shapes and no
    data: the file is extended to its full size as a hole."""
    if out.exists():
        return out
    from benchmarks import shapes

    tmp = out.with_name(out.name + ".partial")
    w, plan = shapes.write_header(name, tmp, "loraflow benchmarks, header only")
    w.close()
    total = sum(-(-shapes.data_bytes(gshape, qtype) // 32) * 32 for _, gshape, qtype in plan)
    size = tmp.stat().st_size
    os.truncate(tmp, -(-size // 32) * 32 + total)
    tmp.replace(out)
    return out


def make_flow(shape: str, k: int, rank: int, outtype: str) -> Path:
    from loraflow import synthetic
    from loraflow.converter.flow import convert_flow
    from loraflow.models import cache_dir

    work = cache_dir("bench", f"digest-{shape}-k{k}-r{rank}")
    flow = work / f"flow-{outtype}.gguf"
    if flow.exists():
        return flow
    base = header_only_base(shape, work / f"{shape}-header-only.gguf")
    n_layer, n_embd, shapes = synthetic.base_gguf_shapes(base)
    names = [f"lora{i}" for i in range(k)]
    peft = []
    for i, name in enumerate(names):
        d = work / name
        if not (d / "adapter_config.json").exists():
            synthetic.write_random_peft_adapter(d, shapes, r=rank, alpha=2 * rank, seed=100 + i, targets=MODULES)
        peft.append((name, str(d)))
    gate = work / "gate.safetensors"
    if not gate.exists():
        synthetic.write_gate_checkpoint(gate, synthetic.random_gate(n_layer, k, n_embd, seed=9), names)
    t0 = time.perf_counter()
    convert_flow(base, peft, gate, flow, outtype=outtype)
    print(f"converted in {time.perf_counter() - t0:.1f} s")
    return flow


def read_once(path: Path) -> int:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while (got := f.readinto(view)):
            n += got
    return n


def sha256_of_file(path: Path) -> str:
    """The floor: one SHA-256 over the file's bytes as they come (what any checksum must pay)."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while (got := f.readinto(view)):
            h.update(view[:got])
    return h.hexdigest()


def main(argv=None) -> int:
    from loraflow.digest import check_digest

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--outtype", default="q8_0")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)

    flow = make_flow(args.shape, args.k, args.rank, args.outtype)
    size = flow.stat().st_size
    read_once(flow)  # into the page cache
    times = {"read the file once": [], "check_digest": [], "sha256 of the file's bytes": []}
    for _ in range(args.reps):
        for what, fn in (("read the file once", read_once), ("check_digest", check_digest),
                         ("sha256 of the file's bytes", sha256_of_file)):
            t0 = time.perf_counter()
            fn(flow)
            times[what].append(time.perf_counter() - t0)
    print(f"{flow}: {size / 2**20:.1f} MiB ({args.shape}, k = {args.k}, rank {args.rank}, {args.outtype}); "
          f"warm page cache, {args.reps} rounds, median (range):")
    for what, ts in times.items():
        med = statistics.median(ts)
        print(f"  {what:<28} {med * 1e3:8.1f} ms ({min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f})  "
              f"{size / med / 2**30:5.2f} GiB/s")
    ratio = [c / r for c, r in zip(times["check_digest"], times["read the file once"])]
    print(f"  check_digest / read once: {statistics.median(ratio):.1f}x ({min(ratio):.1f}-{max(ratio):.1f}), "
          f"same-round ratios")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
