"""Where the gates lean over a whole test set: the mean fusion weight of each LoRA per layer, over
the tokens of the answers LoRA-Flow gave in the runtime (the paper's analysis figure).

Each test problem's prompt and answer are evaluated once more in the runtime from an empty cache
with gate recording on (as `loraflow trace` does for one prompt); the rows kept are the positions
that chose the answer's tokens (the last prompt token to the one before the last answer token).
"""

from __future__ import annotations

import numpy as np


def gate_means(model_gguf, flow_gguf, data, results: list[dict], groups: dict[str, list[int]] | None = None,
               threads: int | None = None) -> dict:
    """{"adapters": names, "groups": {group: {"problems", "tokens", "mean", "std"}}}: mean and std
    [n_layer][k] over the answer tokens of the problems in each group (row indices of `data`, the
    jsonl that `results`, a runtime `loraflow eval` of mode dynamic, was run on; None: all)."""
    from loraflow.errors import LoraFlowError
    from loraflow.gate_training.data import read_rows
    from loraflow.gate_training.evaluate import runtime_prompt_tokens
    from loraflow.runtime.loading import open_llm

    rows = read_rows(data)
    if len(rows) != len(results):
        raise LoraFlowError(f"{data}: {len(rows)} rows, but the evaluation has {len(results)} results")
    groups = groups or {"all": list(range(len(rows)))}
    llm = open_llm(model_gguf, flow_gguf, "dynamic", threads=threads, n_ctx=512)
    try:
        per_row = {}
        for i in sorted({i for idx in groups.values() for i in idx}):
            prompt, answer = runtime_prompt_tokens(llm, rows[i]), results[i]["tokens"]
            if len(prompt) != results[i]["prompt_tokens"]:
                raise LoraFlowError(f"{data}:{rows[i].line}: the prompt has {len(prompt)} tokens here, "
                                    f"{results[i]['prompt_tokens']} in the evaluation")
            if not answer:
                continue
            llm.clear_kv()
            llm.clear_gate_log()
            llm.record_gates(True)
            llm.eval(prompt + answer)
            per_row[i] = llm.gate_weights()[len(prompt) - 1:len(prompt) + len(answer) - 1]   # [answer, layer, k]
            llm.record_gates(False)
        names = list(llm.adapter_names)
    finally:
        llm.close()
    out = {}
    for group, idx in groups.items():
        w = np.concatenate([per_row[i] for i in idx if i in per_row])
        out[group] = {"problems": len(idx), "tokens": int(w.shape[0]),
                      "mean": w.mean(0).round(4).tolist(), "std": w.std(0).round(4).tolist()}
    return {"adapters": names, "groups": out}


def plot_gate_means(means: dict, path, title: str) -> None:
    """One panel per group: each LoRA's mean weight per layer (± std over the answer tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = means["groups"]
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, (group, g) in zip(axes[0], groups.items()):
        mean, std = np.array(g["mean"]), np.array(g["std"])
        layers = np.arange(mean.shape[0])
        for i, name in enumerate(means["adapters"]):
            ax.plot(layers, mean[:, i], marker="o", ms=3, label=name)
            ax.fill_between(layers, mean[:, i] - std[:, i], mean[:, i] + std[:, i], alpha=0.2)
        ax.set_title(f"{group}: {g['problems']} problems, {g['tokens']} answer tokens", fontsize=10, loc="left")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("mean fusion weight (± std over tokens)")
    fig.suptitle(title, fontsize=11)
    fig.savefig(str(path), dpi=100)
    plt.close(fig)

