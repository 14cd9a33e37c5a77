"""Serving many users at once: aggregate decode speed and time to first token of HTTP servers
under 1, 2, 4, 8 and 16 concurrent clients, in one run.

    python -m benchmarks.serve [--clients 1,2,4,8,16] [--requests 3] [--threads 2] [--repeats 2]
                               [--configs flow,flow_serial,stock] [--main flow] [--out benchmarks/results]

    # `loraflow serve` as started with its defaults against one at a time, 8 mixed-mode clients:
    python -m benchmarks.serve --configs flow_default,flow_serial --main flow_default --clients 8 \
        --workloads mixed --repeats 3

The model is SmolLM2-135M-Instruct Q4_1 with the committed compose flow adapter (a Spanish and a
math LoRA, rank 8, and trained gates); every request asks for 48 greedy tokens of a different
prompt, streamed, with `ignore_eos` (llama.cpp's server field, loraflow serve's too) so every
answer has its 48 tokens whatever the mode. Servers, each started fresh on a free loopback port:

- `flow`: `loraflow serve --parallel N` (continuous batching, each request in its own mode);
- `flow_default`: `loraflow serve` with its defaults (4 slots of 2048 tokens, llama-cpp-python's
  threads), whatever --threads says;
- `flow_serial`: `loraflow serve --parallel 1` (one request at a time, as before);
- `flow_det`, `flow_serial_det`: the same two with `--deterministic` (batch-invariant kernels; with
  `--main flow_det` the answers are compared with flow_serial_det's);
- `stock`: stock llama.cpp's `llama-server -np N`, built from the same pinned source without our
  patch (runtime/native/build.py --llama-server; minutes, once), the two LoRAs exported from the
  flow file (`loraflow-convert export-lora`) and loaded, per-request LoRA scales in the body.

Two workloads: `same` (every request in one configuration: flow dynamic, stock with both LoRAs
at 0.5) and `mixed` (requests cycle through eight configurations: flow's dynamic, static,
average, each LoRA alone and the base; stock's per-request scales that differ). Each client sends
--requests requests one after another. Reported per server, workload and client count: aggregate
decode tokens/s (completion tokens of all requests over the wall time), the ratios against
flow_serial and stock at the same load, and flow's median time to first token against a lone
request's (1 client), for the opening burst (every client's first request, all sent at once) and
for the later requests (each sent when its client's previous answer ended, while the others
decode), and how many answers equal flow_serial's for the same request (greedy: the solo
answer); markdown table and JSON.
The machine is shared and noisy: the whole sweep runs --repeats times, the servers' order
rotating each time; the table gives medians over the repeats and the ratios' min-max.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
MAX_TOKENS = 48
FLOW_MIX = [dict(flow_mode="dynamic"), dict(flow_mode="static", flow_weights=[0.3, 0.8]), dict(flow_mode="average"),
            dict(flow_mode="single:lang"), dict(flow_mode="single:math"), dict(flow_mode="off"),
            dict(flow_mode="static", flow_weights=[0.9, 0.2]), dict(flow_mode="dynamic")]
STOCK_MIX = [[0.5, 0.5], [0.3, 0.8], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.9, 0.2], [0.6, 0.6], [0.2, 0.4]]


def prompts(n: int) -> list[str]:
    return [f"Resuelve: Ana tiene {i + 3} manzanas y compra {2 * i + 1} más. ¿Cuántas manzanas tiene?" for i in range(n)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_up(url: str, proc, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"the server did not answer /health:\n{log.read_text()[-3000:]}")


def start(config: str, n: int, args, files: dict, log: Path):
    port = free_port()
    ctx_per_seq = 512
    threads = [] if args.threads == "default" else ["--threads", args.threads]
    if config == "flow_default":   # nothing but the files and the address
        cmd = [str(Path(sys.executable).with_name("loraflow")), "serve", "-m", files["base"], "-f", files["flow"],
               "--host", HOST, "--port", str(port), "--log-level", "warning"]
    elif config in ("flow", "flow_serial", "flow_det", "flow_serial_det"):
        parallel = 1 if config.startswith("flow_serial") else n
        cmd = [str(Path(sys.executable).with_name("loraflow")), "serve", "-m", files["base"], "-f", files["flow"],
               "--host", HOST, "--port", str(port), *threads, "--ctx", str(ctx_per_seq),
               "--parallel", str(parallel), "--log-level", "warning",
               *(["--deterministic"] if config.endswith("_det") else [])]
    else:
        cmd = [files["llama_server"], "-m", files["base"], "--lora", files["lora0"], "--lora", files["lora1"],
               "--host", HOST, "--port", str(port), *(["-t", args.threads] if threads else []), "-np", str(n),
               "-c", str(ctx_per_seq * n), "--no-webui", "--log-disable"]
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    url = f"http://{HOST}:{port}"
    wait_up(url, proc, log)
    return proc, url


def stream_one(url: str, body: dict) -> tuple[float, int, float, str]:
    """(time to first token, completion tokens, total seconds, text) of one streamed completion."""
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = finish = None
    n = 0
    text = []
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choice = (chunk.get("choices") or [{}])[0]
            finish = choice.get("finish_reason") or finish
            if choice.get("text"):
                text.append(choice["text"])
                n += 1
                if first is None:
                    first = time.perf_counter() - t0
    # ignore_eos: an answer that ends by its length has max_tokens tokens (a streamed piece can
    # hold several, when a server keeps back part of a character or a possible stop string)
    if finish == "length":
        n = body["max_tokens"]
    return first if first is not None else float("nan"), n, time.perf_counter() - t0, "".join(text)


def body_for(config: str, workload: str, i: int, prompt: str) -> dict:
    body = dict(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, stream=True, ignore_eos=True)
    if config == "stock":
        scales = STOCK_MIX[i % len(STOCK_MIX)] if workload == "mixed" else [0.5, 0.5]
        body["lora"] = [{"id": j, "scale": s} for j, s in enumerate(scales)]
        body["cache_prompt"] = True
    elif workload == "mixed":
        body.update(FLOW_MIX[i % len(FLOW_MIX)])
    return body


def load(url: str, config: str, workload: str, n_clients: int, n_requests: int) -> dict:
    texts = prompts(n_clients * n_requests)
    results = []
    answers = {}
    lock = threading.Lock()

    def client(c):
        for r in range(n_requests):
            i = c * n_requests + r
            *res, answer = stream_one(url, body_for(config, workload, i, texts[i]))
            with lock:
                results.append((r, *res))
                answers[i] = answer

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    tokens = sum(n for _, _, n, _ in results)
    # the opening burst (every client's first request, sent at once) and the later requests
    # (each sent as the client's previous answer ended, while the others decode)
    burst = [t for r, t, _, _ in results if r == 0]
    later = [t for r, t, _, _ in results if r > 0] or burst
    return dict(tok_s=tokens / wall, ttft_median=statistics.median(t for _, t, _, _ in results),
                ttft_burst=statistics.median(burst), ttft_later=statistics.median(later), tokens=tokens, wall=wall,
                answers=[answers[i] for i in sorted(answers)])


def prepare_files(with_stock: bool) -> dict:
    from loraflow.runtime.demo import COMPOSE_FLOW
    from loraflow.models import cache_dir, default_model_path

    files = dict(base=str(default_model_path()), flow=str(COMPOSE_FLOW))
    if not with_stock:
        return files
    work = cache_dir("bench", "serve")
    for i, name in enumerate(("lang", "math")):
        out = work / f"{name}.lora.gguf"
        if not out.exists():
            subprocess.run([str(Path(sys.executable).with_name("loraflow-convert")), "export-lora", files["flow"],
                            "--adapter", name, "-o", str(out)], check=True)
        files[f"lora{i}"] = str(out)
    proc = subprocess.run([sys.executable, str(REPO / "runtime" / "native" / "build.py"), "--llama-server"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"building stock llama-server failed:\n{proc.stderr[-3000:]}")
    files["llama_server"] = proc.stdout.strip().splitlines()[-1]
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,2,4,8,16")
    ap.add_argument("--requests", type=int, default=3, help="requests each client sends, one after another")
    ap.add_argument("--threads", default="2", help="CPU threads of every server; 'default': their own choice")
    ap.add_argument("--repeats", type=int, default=2, help="times the whole sweep runs (servers' order rotated)")
    ap.add_argument("--configs", default="flow,flow_serial,stock",
                    help="of flow, flow_default, flow_serial, stock; flow_det and flow_serial_det: flow and "
                         "flow_serial with --deterministic")
    ap.add_argument("--main", default="flow", help="the configuration the ratios and answers are of")
    ap.add_argument("--workloads", default="same,mixed")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    configs = args.configs.split(",")
    clients = [int(c) for c in args.clients.split(",")]
    files = prepare_files("stock" in configs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}                               # (config, workload, n) -> one result per repeat
    for rep in range(args.repeats):
        for n in clients:
            order = configs[rep % len(configs):] + configs[:rep % len(configs)]
            for config in order:
                proc, url = start(config, n, args, files, out / f"serve-{config}-{n}.log")
                try:
                    for workload in args.workloads.split(","):
                        r = load(url, config, workload, n, args.requests)
                        runs.setdefault((config, workload, n), []).append(r)
                        print(f"[{rep + 1}/{args.repeats}] {config:12} {workload:6} {n:3} clients: "
                              f"{r['tok_s']:7.1f} tok/s, first token {r['ttft_burst'] * 1000:6.0f} ms burst, "
                              f"{r['ttft_later'] * 1000:6.0f} ms later", flush=True)
                finally:
                    proc.terminate()
                    proc.wait(30)
    med = {key: {m: statistics.median(r[m] for r in rs) for m in ("tok_s", "ttft_median", "ttft_burst", "ttft_later")}
           for key, rs in runs.items()}
    main_ = args.main
    # the solo answers a batched server's are compared with: the serial server on the same kernels
    serial = "flow_serial_det" if main_.endswith("_det") and "flow_serial_det" in configs else "flow_serial"
    lines = ["| workload | clients | " + " | ".join(f"{c} tok/s" for c in configs) +
             f" | {main_} / flow_serial | {main_} / stock | {main_} TTFT burst, later | TTFT / 1 client: burst, later"
             f" | answers = {serial}'s |",
             "|---|---:|" + "---:|" * (len(configs) + 5)]
    for workload in args.workloads.split(","):
        for n in clients:
            cells = [f"{med[(c, workload, n)]['tok_s']:.1f}" for c in configs]
            flow = med.get((main_, workload, n))

            def ratio(other):
                """median ratio (min-max over the repeats, run i against run i)"""
                a, b = runs.get((main_, workload, n)), runs.get((other, workload, n))
                if not a or not b:
                    return "-"
                each = [x["tok_s"] / y["tok_s"] for x, y in zip(a, b)]
                return f"{statistics.median(each):.2f}x ({min(each):.2f}-{max(each):.2f})"

            def same_answers():
                """answers equal to the one-at-a-time server's for the same request, over all repeats"""
                a, b = runs.get((main_, workload, n)), runs.get((serial, workload, n))
                if not a or not b or main_ == serial:
                    return "-"
                pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra["answers"], rb["answers"])]
                return f"{sum(x == y for x, y in pairs)}/{len(pairs)}"

            solo = med.get((main_, workload, 1))
            ttft = f"{flow['ttft_burst'] * 1000:.0f}, {flow['ttft_later'] * 1000:.0f} ms" if flow else "-"
            ttft_ratio = (f"{flow['ttft_burst'] / solo['ttft_median']:.2f}x, "
                          f"{flow['ttft_later'] / solo['ttft_median']:.2f}x") if flow and solo else "-"
            lines.append(f"| {workload} | {n} | " + " | ".join(cells) + f" | {ratio('flow_serial')} | "
                         f"{ratio('stock')} | {ttft} | {ttft_ratio} | {same_answers()} |")
    report = "\n".join(lines)
    print("\n" + report)
    (out / "serve.md").write_text(report + "\n")
    (out / "serve.json").write_text(json.dumps({f"{c}/{w}/{n}": r for (c, w, n), r in runs.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
