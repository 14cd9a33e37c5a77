"""Evaluation: greedy decoding on a jsonl set, answer extraction, accuracy.

Two backends run the same examples:
    torch     the PyTorch FlowModel (base folder or GGUF dequantized, PEFT LoRAs, gate checkpoint)
    runtime   FlowLlama: the patched llama.cpp on a base GGUF with a flow GGUF
The prompt is built the same way in both (the model's chat template when it has one, else the
raw prompt), decoding is greedy and stops at an end-of-generation token or after max_tokens,
so with the same weights (an F32 base) both give the same tokens.

Answer extraction rules (`--extract`):
    last-number       the last number in the text ("1,234.50" -> "1234.5")
    exact             the whole text, stripped
    regex:<pattern>   the first match of the pattern: its first group if it has one, else the match
The reference is the row's "answer" field when present, else its response, passed through the
same rule (the whole stripped text when the rule finds nothing in it).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable, Optional

from loraflow.errors import LoraFlowError

EXTRACT_RULES = ("last-number", "exact", "regex:<pattern>")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")
# tokens llama.cpp treats as end of generation besides EOS (its vocab's EOG heuristic); the torch
# backend stops on them too so both backends stop at the same place
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<end_of_turn>",
              "<|end|>", "</s>", "<eos>")


def make_extractor(rule: str) -> Callable[[str], Optional[str]]:
    if rule == "last-number":
        def last_number(text):
            found = _NUMBER.findall(text)
            if not found:
                return None
            n = found[-1].replace(",", "")
            if "." in n:
                n = n.rstrip("0").rstrip(".") or "0"
            return "0" if n in ("-0", "") else n
        return last_number
    if rule == "exact":
        return lambda text: text.strip()
    if rule.startswith("regex:"):
        try:
            pattern = re.compile(rule[len("regex:"):])
        except re.error as e:
            raise LoraFlowError(f"--extract {rule!r}: not a valid regular expression ({e})") from None

        def by_regex(text):
            m = pattern.search(text)
            if m is None:
                return None
            return (m.group(1) if pattern.groups else m.group(0)).strip()
        return by_regex
    raise LoraFlowError(f"--extract {rule!r}: choose one of {', '.join(EXTRACT_RULES)}")


def reference_answer(row, extract) -> str:
    text = row.answer if row.answer is not None else row.response
    found = extract(text)
    return text.strip() if found is None else found


# -- torch -----------------------------------------------------------------------------------

def stop_token_ids(tokenizer, hf_model) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eos = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_TOKENS if t in vocab)
    return sorted(ids)


def generate_torch(flow, tokenizer, prompts: list[list[int]], max_tokens: int, progress: bool = False,
                   batch_size: int = 1):
    """Greedy continuations (token ids, stop token excluded) of each prompt, `batch_size` prompts at
    a time (left-padded; prompts of similar length go together, the order of the result is the
    order of `prompts`)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    hf = flow.model
    device = next(hf.parameters()).device
    stops = stop_token_ids(tokenizer, hf)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0] if stops else 0
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=stops or None,
                              pad_token_id=pad)
    was_training = hf.training
    hf.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs: list = [None] * len(prompts)
    bar = tqdm(total=len(prompts), disable=not progress, unit="ex", desc="generate")
    with torch.no_grad():
        for start in range(0, len(order), max(1, batch_size)):
            group = order[start:start + max(1, batch_size)]
            width = max(len(prompts[i]) for i in group)
            x = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for row, i in enumerate(group):
                x[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            y = hf.generate(input_ids=x.to(device), attention_mask=mask.to(device), generation_config=config)
            for row, i in enumerate(group):
                new = y[row, width:].tolist()
                cut = next((j for j, t in enumerate(new) if t in stops), len(new))
                outs[i] = new[:cut]
            bar.update(len(group))
    bar.close()
    hf.train(was_training)
    return outs


def count_correct_torch(flow, tokenizer, examples, rule: str, max_tokens: int) -> int:
    """How many tokenized examples the current FlowModel answers right, greedily (dev checkpoint selection)."""
    extract = make_extractor(rule)
    gens = generate_torch(flow, tokenizer, [e.prompt_ids for e in examples], max_tokens)
    return sum(extract(tokenizer.decode(g, skip_special_tokens=True)) == reference_answer(e.row, extract)
               for e, g in zip(examples, gens))


# -- runtime ---------------------------------------------------------------------------------

def runtime_prompt_tokens(llm, row) -> list[int]:
    """The prompt as data.encode_prompt builds it, from the GGUF's own tokenizer and chat template."""
    from loraflow.runtime.prompts import chat_prompt_tokens, has_chat_template

    if has_chat_template(llm):
        return chat_prompt_tokens(llm, row.messages)
    if any(m["role"] != "user" for m in row.messages):
        raise LoraFlowError(f"line {row.line}: system messages and earlier turns need a chat template, "
                            "and this model has none")
    return llm.tokenize(row.prompt_text.encode("utf-8"), add_bos=True, special=True)


def generate_runtime(llm, prompts: list[list[int]], max_tokens: int, progress: bool = False):
    """Greedy continuations in the runtime (stop token excluded)."""
    from tqdm.auto import tqdm

    outs = []
    for ids in tqdm(prompts, disable=not progress, unit="ex", desc="generate"):
        if len(ids) + max_tokens > llm.n_ctx():
            raise LoraFlowError(f"a prompt of {len(ids)} tokens + {max_tokens} new ones does not fit the "
                                f"context of {llm.n_ctx()}")
        llm.clear_kv()
        new = []
        if max_tokens > 0:
            for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
                if llm.is_eog(t):
                    break
                new.append(int(t))
                if len(new) >= max_tokens:
                    break
        outs.append(new)
    return outs


def generate_runtime_batched(llm, prompts: list[list[int]], max_tokens: int, batch_size: int,
                             progress: bool = False):
    """Greedy continuations, batch_size prompts decoded together on the batch engine, every sequence
    in llm's mode: generate_runtime's answers, but for near-tie tokens that a batch's other order of
    sums can flip."""
    from tqdm.auto import tqdm

    from loraflow.runtime.batch_engine import BatchEngine
    from loraflow.runtime.sampling import Sampling

    batch_size = min(batch_size, len(prompts))
    engine = BatchEngine(llm, n_parallel=batch_size, n_ctx=batch_size * llm.n_ctx())
    try:
        requests = [engine.submit(ids, llm.mode, max_tokens=max_tokens,
                                  sampling=Sampling(temperature=0.0)) for ids in prompts]
        return [r.result().tokens for r in tqdm(requests, disable=not progress, unit="ex", desc="generate")]
    finally:
        engine.close()


# -- the whole evaluation ----------------------------------------------------------------------

def score(rows, prompts, gens, texts, rule: str) -> list[dict]:
    extract = make_extractor(rule)
    results = []
    for row, p, g, text in zip(rows, prompts, gens, texts):
        ref = reference_answer(row, extract)
        got = extract(text)
        results.append({"line": row.line, "prompt": row.prompt_text, "reference": ref, "prediction": text,
                        "extracted": got, "correct": got is not None and got == ref,
                        "prompt_tokens": len(p), "tokens": g})
    return results


def format_table(results: list[dict], show: int = 20, width: int = 40, has_output: bool = True) -> str:
    def cut(s, n):
        s = "" if s is None else str(s).replace("\n", "\\n")
        return s if len(s) <= n else s[: n - 1] + "…"

    lines = [f"{'line':>6}  {'ok':3}  {'reference':<16}  {'extracted':<16}  prediction"]
    for r in results[:show]:
        lines.append(f"{r['line']:>6}  {'yes' if r['correct'] else 'no':3}  {cut(r['reference'], 16):<16}  "
                     f"{cut(r['extracted'], 16):<16}  {cut(r['prediction'], width)}")
    if len(results) > show:
        lines.append(f"   ... {len(results) - show} more{' in the JSON file' if has_output else ' (-o FILE writes them all)'}")
    n = len(results)
    c = sum(r["correct"] for r in results)
    lines.append(f"accuracy: {c}/{n} = {c / n:.4f}")
    return "\n".join(lines)


def run_eval(data, backend: str, mode: str, extract: str, max_tokens: int, output=None,
             static_weights=None, base=None, adapters=(), gate=None, dtype: str = "fp32", device: str = "auto",
             model_gguf=None, flow_gguf=None, threads=None, n_gpu_layers=None, show: int = 20,
             progress: bool = True, log=print, batch_size: int = 1, rpc_servers=None, tensor_split=None,
             deterministic: bool = False) -> dict:
    from loraflow.gate_training.data import file_sha256, read_rows
    from loraflow.modes import mode_name, parse_weights

    make_extractor(extract)                      # a bad rule fails before any model loads
    if max_tokens < 1:
        raise LoraFlowError("max-tokens must be at least 1")
    if batch_size < 1:
        raise LoraFlowError("batch-size must be at least 1")
    rows = read_rows(data)
    weights = parse_weights(static_weights)      # a typo fails before any model loads
    mode = mode_name(mode, weights)
    t0 = time.time()
    if backend == "torch":
        from loraflow.gate_training import load
        from loraflow.gate_training.data import encode_prompt

        if base is None or not adapters:
            raise LoraFlowError("--backend torch needs --base and --adapter NAME=PEFT_DIR ...")
        if model_gguf or flow_gguf or rpc_servers:
            raise LoraFlowError("-m/-f/--rpc are for --backend runtime; "
                                "the torch backend takes --base/--adapter/--gate")
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        tokenizer = load.load_tokenizer(base)
        prompts = [encode_prompt(tokenizer, r, f"{data}:{r.line}") for r in rows]
        flow = load.load_flow_model(base, adapters, dtype, load.pick_device(device))
        if mode == "dynamic":
            if gate is None:
                raise LoraFlowError("mode dynamic needs the gate: --gate OUT_DIR/gate.safetensors")
            flow.load_gate(gate)
        flow.set_mode(flow.resolve_mode(mode, weights))
        gens = generate_torch(flow, tokenizer, prompts, max_tokens, progress, batch_size)
        texts = [tokenizer.decode(g, skip_special_tokens=True) for g in gens]
    elif backend == "runtime":
        from loraflow.runtime.loading import open_llm

        if flow_gguf is None:
            raise LoraFlowError("--backend runtime needs the flow file: -f FLOW.gguf (and -m BASE.gguf)")
        if base or adapters or gate:
            raise LoraFlowError("--base/--adapter/--gate are for --backend torch; the runtime takes -m/-f")
        opts = dict(threads=threads, n_gpu_layers=n_gpu_layers, rpc_servers=rpc_servers, tensor_split=tensor_split,
                    deterministic=deterministic)
        llm = open_llm(model_gguf, flow_gguf, "off", n_ctx=512, **opts)
        try:
            mode_ = llm.resolve_mode(mode, weights)  # a bad mode fails before the evaluation starts
            prompts = [runtime_prompt_tokens(llm, r) for r in rows]
            n_ctx = max(len(p) for p in prompts) + max_tokens
            llm.close()
            llm = open_llm(model_gguf, flow_gguf, mode_, n_ctx=n_ctx, **opts)
            gens = (generate_runtime(llm, prompts, max_tokens, progress) if batch_size == 1 else
                    generate_runtime_batched(llm, prompts, max_tokens, batch_size, progress))
            texts = [llm.detokenize(g).decode("utf-8", errors="replace") for g in gens]
        finally:
            llm.close()
    else:
        raise LoraFlowError(f"backend {backend!r}: choose torch or runtime")
    seconds = time.time() - t0
    results = score(rows, prompts, gens, texts, extract)
    correct = sum(r["correct"] for r in results)
    report = {
        "backend": backend, "mode": mode, "static_weights": None if weights is None else weights.values.tolist(), "extract": extract, "max_tokens": max_tokens,
        "batch_size": batch_size, "deterministic": deterministic if backend == "runtime" else None,
        "data": {"path": str(data), "sha256": file_sha256(data)},
        "model": {"base": str(base), "adapters": [{"name": n, "path": str(p)} for n, p in adapters],
                  "gate": None if gate is None else str(gate)} if backend == "torch"
        else {"model": str(model_gguf) if model_gguf else "default", "flow": str(flow_gguf)},
        "examples": len(results), "correct": correct, "accuracy": correct / len(results),
        "seconds": round(seconds, 3), "results": results,
    }
    log(format_table(results, show, has_output=output is not None))
    if output is not None:
        out = Path(output)
        if out.parent and not out.parent.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        log(f"wrote {out}")
    return report
