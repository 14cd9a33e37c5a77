"""What the gate does, token by token and layer by layer (`loraflow trace`).

    t = trace(llm, "Why is the sky blue?", max_tokens=32)
    t.weights            # [n_tokens, n_layer, k]: prompt + generated continuation
    t.texts[:t.n_prompt] # the prompt's tokens as text
    t.plot("trace.png"); t.to_csv("trace.csv"); t.to_json("trace.json")

The prompt is run through the model's chat template (when it has one, unless chat=False),
a continuation is sampled, and then the whole sequence is evaluated once more from an
empty cache with gate recording on, so every token, the last generated one included,
has its weights. These are exactly what `FlowLlama.gate_weights()` returns for those
tokens.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from loraflow.errors import LoraFlowError


@dataclass
class Trace:
    tokens: List[int]       # token ids, prompt then continuation
    texts: List[str]        # each token as text (in context, special tokens spelled out)
    weights: np.ndarray     # [n_tokens, n_layer, k] fusion weights
    names: List[str]        # adapter names, k of them
    n_prompt: int = 0       # the first n_prompt tokens are the prompt
    mode: str = "dynamic"

    @property
    def n_layer(self) -> int:
        return int(self.weights.shape[1])

    def to_csv(self, path) -> None:
        """One row per (token, layer): position, token (newlines as \\n, backslashes doubled), layer,
        then one column per adapter."""
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["position", "token", "layer", *self.names])
            for pos, text in enumerate(self.texts):
                # one line per row for line-based tools: a token's newline is written as \n
                text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
                for il in range(self.n_layer):
                    w.writerow([pos, text, il, *(f"{float(x):.9g}" for x in self.weights[pos, il])])

    def to_json(self, path) -> None:
        data = dict(adapters=self.names, mode=self.mode, n_prompt=self.n_prompt, tokens=self.tokens,
                    texts=self.texts, weights=self.weights.tolist())  # weights[token][layer][adapter]
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)

    def plot(self, path, title: Optional[str] = None, dpi: int = 100) -> None:
        plot_trace(self, path, title=title, dpi=dpi)


def trace(llm, prompt: str, max_tokens: int = 32, chat: Optional[bool] = None, system: Optional[str] = None,
          temperature: float = 0.0, top_p: float = 0.95, top_k: int = 40, repeat_penalty: float = 1.0,
          seed: Optional[int] = None) -> Trace:
    """Generate a continuation of `prompt` with `llm` (a FlowLlama) and return the fusion
    weights of every token of prompt + continuation. Greedy unless temperature > 0."""
    from loraflow.runtime.prompts import chat_prompt_tokens, has_chat_template, messages_for

    if llm.flow is None:
        raise LoraFlowError("trace needs a flow adapter (FlowLlama(..., flow_path=...))")
    if llm.mode.kind == "off":
        raise LoraFlowError("mode 'off' fuses nothing: trace a mode with weights (dynamic, static, ...)")
    if chat is None:
        chat = has_chat_template(llm)
    if chat:
        prompt_tokens = chat_prompt_tokens(llm, messages_for(prompt, system))
    else:
        if system:
            raise LoraFlowError("a system message needs the chat template (drop --raw)")
        prompt_tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True)
    n_ctx = min(llm.n_ctx(), len(llm.input_ids))
    if len(prompt_tokens) + max_tokens > n_ctx:
        raise LoraFlowError(f"prompt ({len(prompt_tokens)} tokens) + {max_tokens} new tokens exceed the context "
                            f"({n_ctx}); use a larger --ctx")

    was_recording = llm.recording
    llm.record_gates(False)
    generated: List[int] = []
    if seed is not None:
        llm.set_seed(seed)
    if max_tokens > 0:
        for tok in llm.generate(prompt_tokens, temp=temperature, top_p=top_p, top_k=top_k,
                                repeat_penalty=repeat_penalty, reset=True):
            if llm.is_eog(tok):
                break
            generated.append(int(tok))
            if len(generated) >= max_tokens:
                break
    tokens = [int(t) for t in prompt_tokens] + generated

    # evaluate everything once more from an empty cache, recording every token's weights
    llm.clear_kv()
    llm.clear_gate_log()
    llm.record_gates(True)
    try:
        llm.eval(tokens)
        weights = llm.gate_weights()
    finally:
        llm.record_gates(was_recording)
        llm.clear_gate_log()
    if weights.shape[0] != len(tokens):
        raise LoraFlowError(f"recorded {weights.shape[0]} gate rows for {len(tokens)} tokens")
    texts = [llm.detokenize([t], prev_tokens=tokens[:i], special=True).decode("utf-8", errors="replace")
             for i, t in enumerate(tokens)]
    return Trace(tokens, texts, weights, llm.adapter_names, n_prompt=len(prompt_tokens), mode=llm.mode.name)


def _label(text: str) -> str:
    """A token as an axis label: visible whitespace, no mathtext."""
    return (text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")
            .replace(" ", "\u00b7") or "\u2205")


def plot_trace(t: Trace, path, title: Optional[str] = None, dpi: int = 100) -> None:
    """One heatmap per adapter (layers x tokens) and the per-layer mean weight of each adapter."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise LoraFlowError("drawing a trace needs matplotlib: pip install 'loraflow[viz]'") from None

    n, n_layer, k = t.weights.shape
    if n == 0:
        raise LoraFlowError("nothing to draw: the trace has no tokens")
    width = float(np.clip(3 + 0.16 * n, 8, 40))
    heat_h = float(np.clip(0.9 + 0.12 * n_layer, 1.6, 5))
    fig, axes = plt.subplots(k + 1, 1, figsize=(width, k * (heat_h + 0.9) + 3.2),
                             gridspec_kw=dict(height_ratios=[heat_h + 0.9] * k + [3.0]), layout="constrained")
    vmin, vmax = float(t.weights.min()), float(t.weights.max())
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    step = max(1, int(np.ceil(n / 160)))  # at most ~160 labels
    labels = [_label(s) for s in t.texts]
    fontsize = 8 if n <= 80 else 6
    for i in range(k):
        ax = axes[i]
        im = ax.imshow(t.weights[:, :, i].T, aspect="auto", origin="lower", cmap="viridis",
                       vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(f"adapter '{t.names[i]}': fusion weight per layer and token", fontsize=10, loc="left")
        ax.set_ylabel("layer")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xticks(range(0, n, step))
        ax.set_xticklabels(labels[::step], rotation=90, fontsize=fontsize)
        if 0 < t.n_prompt < n:
            ax.axvline(t.n_prompt - 0.5, color="white", lw=1.2, ls="--")
        fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03)
    ax = axes[k]
    layers = np.arange(n_layer)
    for i in range(k):
        mean, std = t.weights[:, :, i].mean(0), t.weights[:, :, i].std(0)
        ax.plot(layers, mean, marker="o", ms=3, label=t.names[i])
        ax.fill_between(layers, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean weight (± std over tokens)")
    ax.set_title("per-layer mean fusion weight", fontsize=10, loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title or f"LoRA-Flow gate weights ({t.mode}): {n} tokens "
                 f"({t.n_prompt} prompt, {n - t.n_prompt} generated; dashed line = start of generation)",
                 fontsize=11)
    fig.savefig(os.fspath(path), dpi=dpi)
    plt.close(fig)
