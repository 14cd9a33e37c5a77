"""`loraflow demo`: the default model with the compose flow adapter (a Spanish LoRA and a math
LoRA fused by trained LoRA-Flow gates, made by recipes/compose), answering a Spanish word problem
and showing, token by token, which LoRA the gates lean on; then the same question under the
baselines the same file serves (each LoRA alone, their average)."""

from __future__ import annotations

import sys
from pathlib import Path

import loraflow
from loraflow.errors import LoraFlowError
from loraflow.models import default_model_path

# made by `python -m recipes.compose.run` (seed 0): the work folder's compose.flow.gguf, copied here
COMPOSE_FLOW = Path(loraflow.__file__).resolve().parent / "adapters" / "compose-es-math.flow.gguf"  # package data
# the first problem of the recipe's test set (seed 0): held out from every training set
DEFAULT_PROMPT = "Elena tiene 8 bolsas con 2 camisas en cada bolsa. ¿Cuántas camisas tiene Elena en total?"


def run_demo(prompt: str, max_tokens: int, threads: int, flow: Path | None = None) -> None:
    from loraflow.runtime import FlowLlama
    from loraflow.runtime.trace import trace

    base = default_model_path()
    flow = Path(flow) if flow else COMPOSE_FLOW
    if not flow.is_file():
        raise LoraFlowError(f"{flow}: no such flow file (rebuild it with `make compose`)")
    llm = FlowLlama(str(base), flow_path=str(flow), n_ctx=1024, n_threads=threads, seed=0, verbose=False)
    try:
        names = llm.adapter_names
        print(f"model: {base.name}\nflow:  {flow.name} (adapters: {', '.join(names)})\n\nuser: {prompt}")
        t = trace(llm, prompt, max_tokens=max_tokens)
        print(f"assistant (LoRA-Flow): {''.join(t.texts[t.n_prompt:]).strip()}\n")
        print("the gates at each answer token (mean over the {} layers):".format(t.n_layer))
        print(f"  {'token':<14}" + "".join(f"{n:>8}" for n in names))
        mean = t.weights.mean(axis=1)                 # [n_tokens, k]
        # row i is the token fed at position i; its weights shape the prediction of token i + 1
        for pos in range(t.n_prompt - 1, len(t.tokens) - 1):
            nxt = t.texts[pos + 1]
            bar = "#" * min(20, max(0, int(round(10 * mean[pos, -1]))))
            print(f"  {repr(nxt):<14}" + "".join(f"{w:8.2f}" for w in mean[pos]) + f"  {bar}")
        print(f"  (# = {names[-1]}'s weight x 10; a row's weights are those at the token before, which predicts it;"
              "\n   weights are softmax + bias, so they can leave [0, 1])")
        print("\nthe same question under the baselines in the same file:")
        for mode in [f"single:{n}" for n in names] + ["average"]:
            llm.set_mode(mode)
            out = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                             temperature=0.0)
            print(f"  {mode:<12} {out['choices'][0]['message']['content'].strip()}")
    finally:
        llm.close()
    sys.stdout.flush()
